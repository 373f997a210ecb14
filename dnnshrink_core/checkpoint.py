"""Structure-learning checkpoints: one file per epoch, written atomically, read safely."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .errors import ArtifactError
from .fileio import atomic_write


class Checkpoints:
    """``folder/baseline.pt`` (the baseline's weights and score), ``folder/epoch-NNNN.pt``, and
    ``folder/learned.pt`` once structure learning has finished (the chosen channels), so a
    resumed run goes straight to generation."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _write(self, path: Path, payload: Dict[str, Any]) -> Path:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with atomic_write(path) as f:
            f.write(buffer.getvalue())
        return path

    def save_baseline(self, state: Dict[str, torch.Tensor], score: float) -> Path:
        return self._write(self.folder / "baseline.pt", {"state": _cpu(state), "score": float(score)})

    def save_epoch(self, epoch: int, state: Dict[str, torch.Tensor]) -> Path:
        return self._write(self.folder / f"epoch-{epoch:04d}.pt", {"epoch": int(epoch), "state": _cpu(state)})

    def save_learned(self, keep: np.ndarray, epochs: int, max_epochs: int, info: Dict[str, Any],
                     state: Dict[str, torch.Tensor]) -> Path:
        """The outcome of structure learning: the kept units, the epochs it took out of the
        ``max_epochs`` it had, the algorithm's figures (as JSON text: a checkpoint holds only
        tensors and plain values) and the weights."""
        return self._write(self.folder / "learned.pt", {
            "keep": torch.from_numpy(np.asarray(keep, dtype=bool)), "epochs": int(epochs),
            "max_epochs": int(max_epochs), "info": json.dumps(info, default=_plain), "state": _cpu(state)})

    def learned(self) -> Optional[Dict[str, Any]]:
        """What :meth:`save_learned` wrote (``keep`` as a NumPy array, ``info`` as a dict), or None."""
        path = self.folder / "learned.pt"
        if not path.is_file():
            return None
        payload = self.load(path)
        try:
            return {"keep": payload["keep"].numpy().astype(bool), "epochs": int(payload["epochs"]),
                    "max_epochs": int(payload["max_epochs"]), "info": json.loads(payload["info"]),
                    "state": payload["state"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"checkpoint {path} is not a finished structure-learning record ({exc}); "
                                "delete it to learn again from the last epoch checkpoint") from exc

    def latest(self) -> Optional[Path]:
        """The newest epoch checkpoint, or None."""
        files = sorted(self.folder.glob("epoch-*.pt"))
        return files[-1] if files else None

    def load(self, path: Path) -> Dict[str, Any]:
        """Read a checkpoint with ``weights_only=True``; a truncated or tampered file is an error."""
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:
            raise ArtifactError(f"checkpoint {path} cannot be read safely ({type(exc).__name__}: {exc}); "
                                "delete it to resume from the one before") from exc


def _plain(value: Any) -> Any:
    """JSON for NumPy values in an algorithm's figures."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _cpu(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
