"""What the ImageNet-sized benches share: one quiet, reproducible torch set-up."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch


def imagenet_setup(threads: int = 2, seed: int = 0) -> torch.Tensor:
    """Fix torch's threads (the same as the ONNX Runtime sessions, so both sides compare
    fairly) and seed, silence library warnings, and return one 224×224 RGB example."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    warnings.simplefilter("ignore")
    return torch.randn(1, 3, 224, 224)


def latency_row(model: str, variant: str, macs_kept: float, predicted_ms: float, timed: Tuple[float, float],
                baseline: Tuple[float, float], **extra: Any) -> Dict[str, Any]:
    """One timed variant: MACs kept (a fraction of the baseline's), predicted ms, the fastest
    and median measured ms (``timed``, seconds, as ``baseline``'s), the speed-up and the
    efficiency (speed-up / MACs cut) by the fastest run and by the median."""
    (fast, med), (base_fast, base_med) = timed, baseline
    cut = 1.0 / macs_kept
    return {"model": model, "variant": variant, **extra, "macs_kept": macs_kept, "predicted_ms": predicted_ms,
            "fastest_ms": 1e3 * fast, "median_ms": 1e3 * med, "speedup_fastest": base_fast / fast,
            "speedup_median": base_med / med, "macs_cut": cut, "efficiency_fastest": base_fast / fast / cut,
            "efficiency_median": base_med / med / cut}


def finish(rows: List[Dict[str, Any]], path: Optional[str]) -> None:
    """Print the load average at the end (the timings' context) and write the rows as JSON."""
    print(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}")
    if path:
        Path(path).write_text(json.dumps(rows, indent=2))
