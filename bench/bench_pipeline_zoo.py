"""The model zoo through the whole default pipeline: does every model shrink, export and verify?

``bench_zoo.py`` checks the generator alone (trace, masks, generate). This runs what a user's
first command runs on each model: ``shrink()`` with the defaults (``scale: auto``,
``round_to: auto``, the shipped latency profile) and ``algorithm: magnitude`` (no training
needed; it removes channels with or without BatchNorm), to ``--macs`` of the MACs, exported to
ONNX and verified by onnxruntime against PyTorch. Each model runs in its own process with a
time limit; rows (what ``scale: auto`` chose and the gain it saw, MACs and predicted time
kept, or the error) are appended to a JSON-lines file and done models are skipped, so a run
resumes. The models: the same seeded round-robin sample of timm as ``bench_zoo.py``.

    python bench/bench_pipeline_zoo.py --count 40 --out results/pipeline-zoo.jsonl
    python bench/bench_pipeline_zoo.py --table --out results/pipeline-zoo.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

HERE = Path(__file__).parent


def run_one(name: str, size: int, macs: float) -> Dict[str, Any]:
    """One model through ``shrink()``; its row."""
    import contextlib
    import io
    import tempfile
    import warnings

    import torch

    from bench_zoo import _build
    from dnnshrink_core.pipeline import shrink

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, x = _build(name, size)
    model.eval()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        result = shrink(model, x, train_one_epoch=lambda m, lr: None, test=lambda m: 0.0, algorithm="magnitude",
                        max_epochs=0, target_macs=macs, finetune=False, device="cpu", progress=False,
                        onnx_latency=False, exporters=("onnx",), tensorboard=False, out_dir=out, force=True)
    extra = result.report.extra
    learning, resources = extra["structure_learning"], extra["resources"]
    return {"model": name, "ok": True, "seconds": round(time.perf_counter() - started, 1),
            "scale": learning.get("scale"), "capacity_gain": learning.get("capacity_gain"),
            "scale_why": learning.get("scale_why"),
            "macs_kept": resources["macs"]["after"] / resources["macs"]["before"],
            "predicted_time": (resources["latency_ms"]["after"] / resources["latency_ms"]["before"]
                               if "latency_ms" in resources else None)}


def _child(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """``run_one`` in a process of its own, within ``--timeout``."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); from bench_pipeline_zoo import run_one; "
            f"print('ROW' + json.dumps(run_one({name!r}, {args.size}, {args.macs})))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "ok": False, "error": f"over the {args.timeout} s limit"}
    for line in proc.stdout.splitlines():
        if line.startswith("ROW"):
            return json.loads(line[3:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    error = lines[-1][:300] if lines else f"exit {proc.returncode}"
    # a target the model cannot reach is refused before any work, with the reason: the product working
    return {"model": name, "ok": False, "error": error, "refused": "TargetError" in error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40, help="models from the sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--out", default=str(HERE / "results" / "pipeline-zoo.jsonl"))
    parser.add_argument("--table", action="store_true", help="print what was measured")
    args = parser.parse_args()
    path = Path(args.out)
    done = {}
    if path.exists():
        done = {row["model"]: row for row in map(json.loads, path.read_text().splitlines())}
    if not args.table:
        from bench_zoo import has_batchnorm, sample

        names = [n for n in sample(10 * args.count, args.seed, False) if n not in done]
        ran = 0
        for name in names:
            if len(done) >= args.count or ran >= args.count:
                break
            if not has_batchnorm(name):
                continue
            row = _child(name, args)
            ran += 1
            done[name] = row
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name:<40} " + (f"{row['scale']:<10} gain {row['capacity_gain']} MACs {row['macs_kept']:.3f} "
                                    f"time {row['predicted_time']:.3f} {row['seconds']} s" if row["ok"]
                                    else f"{'REFUSED' if row.get('refused') else 'FAILED'} {row['error']}"), flush=True)
    rows = list(done.values())
    ok = [r for r in rows if r["ok"]]
    refused = [r for r in rows if r.get("refused")]
    chose = sum(r["scale"] == "capacity" for r in ok)
    print(f"\n{len(ok)} of {len(rows)} models shrunk, exported and verified ({len(refused)} targets refused as "
          f"unreachable, with the reason); scale auto took the capacity step on {chose}")
    for r in rows:
        if not r["ok"]:
            print(f"  {r['model']}: {'refused: ' if r.get('refused') else ''}{r['error']}")


if __name__ == "__main__":
    main()
