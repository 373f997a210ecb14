"""Structure-learning checkpoints: one file per epoch, written atomically, read safely."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .errors import ArtifactError
from .fileio import atomic_write


class Checkpoints:
    """``folder/baseline.pt`` (the baseline's weights and score) and ``folder/epoch-NNNN.pt``."""

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


def _cpu(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
