"""What the ImageNet-sized benches share: one quiet, reproducible torch set-up."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

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


def finish(rows: List[Dict[str, Any]], path: Optional[str], table_width: Optional[int] = None) -> None:
    """Print the load average at the end (the timings' context) and write the rows as JSON;
    with ``table_width``, print every row first (:func:`print_rows`)."""
    if table_width is not None:
        print("\nall rows")
        print_rows(rows, width=table_width)
    print(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}")
    if path:
        Path(path).write_text(json.dumps(rows, indent=2))


def shrink_untrained(model: Any, x: torch.Tensor, **options: Any) -> Any:
    """``shrink()`` with ``magnitude`` and nothing trained, timed, exported or printed (the
    pipeline's structure alone); ``options`` add to or replace those settings."""
    import contextlib
    import io

    from dnnshrink_core.pipeline import shrink

    settings = dict(train_one_epoch=lambda m, lr: None, test=lambda m: 0.0, algorithm="magnitude", max_epochs=0,
                    finetune=False, device="cpu", progress=False, onnx_latency=False, exporters=(),
                    tensorboard=False)
    with contextlib.redirect_stdout(io.StringIO()):
        return shrink(model, x, **{**settings, **options})


def export(model: Any, x: torch.Tensor, path: Path) -> None:
    """ONNX of ``model`` on ``x``: torch's TorchScript exporter (a few times faster than the
    dynamo one, the same graph once onnxruntime optimises it), else dnnshrink's exporter."""
    import dnnshrink_core as ds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
        except Exception:
            ds.export(model, x, "onnx", path)


def time_networks(nets: Dict[str, Any], x: torch.Tensor, rounds: int, runs: int,
                  threads: int = 2, spinning: Union[str, Dict[str, str]] = "run") -> Dict[str, Tuple[float, float]]:
    """Per label, the (fastest, median) seconds of its network exported to ONNX and run with
    onnxruntime (``threads`` intra-op threads waiting as ``spinning`` says, see
    ``dnnshrink_core.timing.session``; a mapping: per label), the networks interleaved in
    blocks."""
    from dnnshrink_core.timing import fastest_and_median, interleaved_times, session

    with tempfile.TemporaryDirectory() as tmp:
        sessions, feeds = {}, {}
        for label, net in nets.items():
            path = Path(tmp) / f"{len(sessions)}.onnx"
            export(net, x, path)
            mode = spinning if isinstance(spinning, str) else spinning[label]
            sessions[label] = session(str(path), threads, mode)
            feeds[label] = {sessions[label].get_inputs()[0].name: x.numpy()}
        return fastest_and_median(interleaved_times(sessions, feeds, rounds, runs))


def print_rows(rows: List[Dict[str, Any]], label: str = "variant", width: int = 38,
               blocks: bool = False) -> None:
    """The timed rows as a table (``blocks``: with the residual blocks dropped)."""
    print(f"{'model':<19}{label:<{width}}{'blocks' if blocks else '':>8}{'MACs kept':>10}{'pred ms':>9}"
          f"{'fast ms':>9}{'med ms':>9}{'speed-up':>10}{'MACs cut':>10}{'eff.':>7}{'eff.med':>8}")
    for r in rows:
        if "refused" in r:
            print(f"{r['model']:<19}{r[label]:<{width}}  refused: {r['refused'][:90]}")
            continue
        dropped = f"{r['blocks_dropped']:>4}/{r['of_blocks']:<3}" if blocks else " " * 8
        print(f"{r['model']:<19}{r[label]:<{width}}{dropped}{r['macs_kept']:>10.3f}{r['predicted_ms']:>9.2f}"
              f"{r['fastest_ms']:>9.2f}{r['median_ms']:>9.2f}{r['speedup_fastest']:>9.2f}x{r['macs_cut']:>9.2f}x"
              f"{r['efficiency_fastest']:>7.2f}{r['efficiency_median']:>8.2f}")


def timing_options(parser: Any) -> None:
    """The options every timed bench takes: interleaved rounds, runs per round, the JSON out."""
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--json", help="write the rows here")


def torchvision_models(names: List[str], x: torch.Tensor):
    """Per name, torchvision's model (``weights=None``, eval mode), its channel graph on ``x``
    and its flops and latency cost models; says the load average first (the timings' context)."""
    import torchvision

    import dnnshrink_core as ds
    from dnnshrink_core.cost import CostModel

    print(f"1-minute load average at the start: {os.getloadavg()[0]:.2f}")
    for name in names:
        model = torchvision.models.get_model(name, weights=None).eval()
        graph = ds.trace(model, x)
        yield name, model, graph, CostModel(graph, model, "flops"), CostModel(graph, model, "latency")


def whole_and_thin(models: Dict[str, Any], x: torch.Tensor) -> Dict[str, Any]:
    """Each network and the same cut to a quarter of its widths (what the calibration's check
    times), labelled ``name`` and ``name x0.25``."""
    from dnnshrink_plugins.costs.calibrate import THIN_SHARE, thin_network

    nets = {}
    for name, model in models.items():
        nets[name], nets[f"{name} x{THIN_SHARE:g}"] = model, thin_network(model, x)
    return nets


def judge_profiles(profiles: Dict[str, Any], nets: Dict[str, Any], x: torch.Tensor, rounds: int, runs: int
                   ) -> Dict[str, Dict[str, Any]]:
    """Per network, its fastest and median measured ms (all timed once, interleaved) and the
    ms each profile predicts for it, with the error of each against the fastest run (%)."""
    from dnnshrink_plugins.costs.calibrate import predict_network

    predicted = {label: {p: predict_network(net, x, profile) for p, profile in profiles.items()}
                 for label, net in nets.items()}
    timed = time_networks(nets, x, rounds, runs)
    out = {}
    for label in nets:
        fastest, median = (1e3 * t for t in timed[label])
        out[label] = {"fastest_ms": round(fastest, 3), "median_ms": round(median, 3), "predicted_ms": predicted[label],
                      "error_pct": {p: round(100 * (ms / fastest - 1), 1) for p, ms in predicted[label].items()}}
    return out
