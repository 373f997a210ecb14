"""One line per run report for ``bench/device_check.sh``: device, MACs kept, scores, and the
three latencies (PyTorch on the run's device, predicted, onnxruntime on the CPU).

    python bench/device_summary.py RUN/report.json [RUN2/report.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(path: Path) -> str:
    """The line for one ``report.json`` (or why there is none)."""
    if not path.is_file():
        return f"{path}: no report (the run failed; see its log)"
    report = json.loads(path.read_text())
    base, small = report["baseline"], report["shrunk"]
    onnx = report.get("onnx_latency", {})
    predicted = report.get("resources", {}).get("latency_ms", {})
    return (f"{path.parent.name}: device {report['device']}, MACs kept {small['macs'] / base['macs']:.3f}, score "
            f"{base['score']:.4f} -> {small['score']:.4f}, PyTorch ms {base['latency_ms']:.3f} -> "
            f"{small['latency_ms']:.3f}, predicted ms {predicted.get('before', float('nan')):.3f} -> "
            f"{predicted.get('after', float('nan')):.3f}, onnxruntime ms {onnx.get('baseline_ms', float('nan')):.3f}"
            f" -> {onnx.get('shrunk_ms', float('nan')):.3f}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(summary(Path(name)))
