"""The model zoo, dnnshrink vs Torch-Pruning: does every model shrink exactly?

For each model (random weights and BatchNorm statistics, eval mode): half of the channels of
every coupled group that dnnshrink can remove are killed in every BatchNorm of the group
(gamma = beta = 0, as MorphNet's group penalty leaves them; when dnnshrink cannot trace the
model, half of every BatchNorm's channels independently), then

* dnnshrink: ``trace`` (torch.fx, or by running the model when fx cannot), ``alive_masks``,
  ``generate``; the shrunk network is compared with the killed baseline;
* Torch-Pruning (DepGraph): every group whose coupled BatchNorms are all dead at some
  channels is pruned at exactly those channels (its best exact shot), then compared the
  same way.

Exact means a relative error below 1e-4 on the example input. The models: a seeded sample of
timm models that have BatchNorm, drawn round-robin across families (``--count``, default 150;
``--all`` for the whole list), plus ultralytics YOLOv8n/s and YOLO11n built from their yaml
(``YOLO_OFFLINE=1``, no download). Every model runs in its own process with a time limit;
results are appended to a JSON-lines file as they come, and models already there are
skipped, so the run resumes where it stopped.

    python bench/bench_zoo.py                       # sample of 150 + YOLO, 96x96, batch 1
    python bench/bench_zoo.py --count 40 --timeout 240
    python bench/bench_zoo.py --table               # the summary table of what was measured
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("YOLO_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "zoo.jsonl"
YOLO = ["yolov8n.yaml", "yolov8s.yaml", "yolo11n.yaml"]
TOLERANCE = 1e-4


# --- one model (runs in a child process) ----------------------------------------------
def _init_bns(model: Any, seed: int = 0) -> None:
    """Random, non-trivial BatchNorm statistics and affine parameters (timm/YOLO start at 1/0)."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _zero(model: Any, name: str, channels: Any) -> None:
    """gamma = beta = 0 at ``channels`` of source ``name`` (a BatchNorm module, or the
    functional parameter at that path with its ``bias`` sibling)."""
    import torch
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(name)
        params = [getattr(module, "weight", None), getattr(module, "bias", None)]
    except AttributeError:
        module = model.get_submodule(owner)
        params = [getattr(module, attr, None), getattr(module, attr.replace("weight", "bias"), None)]
    with torch.no_grad():
        for p in params:
            if isinstance(p, torch.Tensor) and p.dim() == 1:
                p[channels] = 0.0


def _kill_half(model: Any, x: Any, seed: int = 0) -> str:
    """Kill half of every coupled channel group, as MorphNet's group penalty leaves them: the
    same channels in every BatchNorm of the group (gamma = beta = 0). The groups come from
    dnnshrink's trace; when it cannot trace, half of every BatchNorm's channels die
    independently. Returns how the channels were chosen."""
    import numpy as np
    import torch
    from torch import nn
    _init_bns(model, seed)
    rng = np.random.default_rng(seed)
    try:
        import dnnshrink_core as ds
        graph = ds.trace(model, x)
    except Exception:
        g = torch.Generator().manual_seed(seed)
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                _zero(model, name, torch.randperm(m.num_features, generator=g)[: m.num_features // 2])
        return "independent"
    dead = np.zeros(graph.num_units, dtype=bool)
    for group in graph.groups:
        units = group.units[graph.unit_removable[group.units]]
        if len(units) > 1:
            dead[rng.choice(units, size=len(units) // 2, replace=False)] = True
    for idx, name in enumerate(graph.source_modules):
        rows = (graph.src_module == idx) & dead[graph.src_unit]
        if rows.any():
            _zero(model, name, torch.as_tensor(graph.src_channel[rows]))
    return "per group"


def _reach(model: Any, x: Any) -> Dict[str, Any]:
    """What BatchNorm can reach at all: the share of the parameters in removable channels, and
    the most common reasons why the other channels that have a BatchNorm are kept."""
    import numpy as np
    import dnnshrink_core as ds
    from dnnshrink_core.cost import CostModel
    graph = ds.trace(model, x)
    costs = CostModel(graph, model, kind="params")
    full = np.ones(graph.num_units, dtype=bool)
    total = sum(p.numel() for p in model.parameters())
    reach = (costs.cost(full) - costs.cost(~graph.unit_removable)) / total
    held = graph.unit_has_source & ~graph.unit_removable
    why: Dict[str, int] = defaultdict(int)
    for unit in np.flatnonzero(held):
        reason = graph.unit_reason[unit]
        why[graph.reasons[reason] if reason >= 0 else
            "not made zero by their BatchNorm on every path (a layer without BatchNorm also writes them, "
            "as into a residual stream)"] += 1
    top = sorted(why.items(), key=lambda kv: -kv[1])[:2]
    return {"reach": round(float(reach), 3), "held": int(held.sum()), "removable": int(graph.unit_removable.sum()),
            "held_why": [f"{n} units: {r[:120]}" for r, n in top]}


def _rel_err(a: Any, b: Any) -> float:
    from dnnshrink_core.plugin_api import flatten_outputs
    fa, fb = flatten_outputs(a), flatten_outputs(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        return float("inf")
    return max((((x - y).norm() / x.norm().clamp_min(1e-12)).item() for x, y in zip(fa, fb)), default=0.0)


def _err_in_double(reference: Any, pruned: Any, x: Any) -> float:
    """The error of ``pruned`` against ``reference`` with both in float64: a deep network
    with random weights can amplify float32 rounding (a different summation order once
    channels are gone) far beyond the tolerance; in float64 an exact pruning agrees."""
    import torch
    with torch.no_grad():
        return _rel_err(copy.deepcopy(reference).double()(x.double()), copy.deepcopy(pruned).double()(x.double()))


def _build(name: str, size: int) -> Any:
    import torch
    if name in YOLO:
        from ultralytics.nn.tasks import DetectionModel
        model = DetectionModel(name, verbose=False)
        return model, torch.randn(1, 3, max(size, 64), max(size, 64))
    import timm
    model = timm.create_model(name, pretrained=False)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    fixed = cfg.get("fixed_input_size", False)
    side = cfg.get("input_size", (3, 224, 224))[-1] if fixed else max(size, cfg.get("min_input_size", (3, 0, 0))[-1])
    return model, torch.randn(1, cfg.get("input_size", (3,))[0], side, side)


def _torch_pruning(model: Any, x: Any) -> Dict[str, Any]:
    """Prune, with Torch-Pruning's DependencyGraph, the channels dead in every coupled BatchNorm."""
    import torch_pruning as tp
    from torch import nn
    bn_types = nn.modules.batchnorm._BatchNorm
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for bn in [m for m in model.modules() if isinstance(m, bn_types) and m.affine]:
        dead = ((bn.weight == 0) & (bn.bias == 0)).nonzero().flatten().tolist()
        if not dead or len(dead) >= bn.num_features:
            continue
        group = graph.get_pruning_group(bn, tp.prune_batchnorm_out_channels, idxs=dead)
        ok = [True] * len(dead)
        for dep, idxs in group:
            member = dep.target.module
            if isinstance(member, bn_types) and member.affine:
                if len(idxs) != len(dead):
                    ok = [False] * len(dead)
                    break
                for i, j in enumerate(idxs):
                    j = int(j)
                    ok[i] = ok[i] and bool(member.weight[j] == 0 and member.bias[j] == 0)
        keep = [d for d, flag in zip(dead, ok) if flag]
        if not keep:
            continue
        group = graph.get_pruning_group(bn, tp.prune_batchnorm_out_channels, idxs=keep)
        if graph.check_pruning_group(group):
            group.prune()
    return {"seconds": time.perf_counter() - start}


def _stage(name: str) -> None:
    """Say which stage runs, so that a model stopped at the time limit names where."""
    print(f"stage: {name}", flush=True)


def has_batchnorm(name: str) -> bool:
    """Whether timm model ``name`` has a BatchNorm, looked at on the meta device (no weights
    are made, so this takes milliseconds); True when the look itself fails."""
    import timm
    import torch
    from torch import nn
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False)
    except Exception:
        return True
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.modules())


def run_one(name: str, size: int) -> Dict[str, Any]:
    """Measure one model; every failure is caught and named."""
    import torch
    from torch import fx, nn
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    row: Dict[str, Any] = {"model": name}
    if name not in YOLO and not has_batchnorm(name):
        row["error"] = "no BatchNorm"
        return row
    _stage("build")
    try:
        model, x = _build(name, size)
    except Exception as exc:
        row["error"] = f"build: {type(exc).__name__}: {str(exc)[:200]}"
        return row
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        row["error"] = "no BatchNorm"
        return row
    model = model.eval()
    _stage("kill")
    row["kill"] = _kill_half(model, x)
    row["input"] = list(x.shape)
    params = sum(p.numel() for p in model.parameters())
    row["params"] = params
    _stage("forward")
    with torch.no_grad():
        try:
            ref = model(x)
        except Exception as exc:
            row["error"] = f"forward: {type(exc).__name__}: {str(exc)[:200]}"
            return row
    import dnnshrink_core as ds
    baseline = copy.deepcopy(model)
    _stage("dnnshrink")
    try:
        start = time.perf_counter()
        graph = ds.trace(model, x)
        masks = ds.alive_masks(model, x)
        small = ds.generate(model, x, masks)
        row["ds_seconds"] = round(time.perf_counter() - start, 2)
        row["ds_traced"] = "recorded" if graph.traces[0].specialized else "fx"
        row["ds_returns"] = "GraphModule" if isinstance(small, fx.GraphModule) else "own class"
        row["ds_kept"] = sum(p.numel() for p in small.parameters()) / params
        with torch.no_grad():
            row["ds_err"] = _rel_err(ref, small(x))
        if row["ds_err"] >= TOLERANCE:
            row["ds_err64"] = _err_in_double(model, small, x)
        if row["ds_kept"] >= 0.9:  # name why so little goes
            row.update(_reach(baseline, x))
    except Exception as exc:
        row["ds_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print("partial: " + json.dumps(row), flush=True)  # kept if Torch-Pruning runs past the limit
    _stage("torch-pruning")
    try:
        import torch_pruning  # noqa: F401
        tp_model = baseline
        out = _torch_pruning(tp_model, x)
        row["tp_seconds"] = round(out["seconds"], 2)
        row["tp_kept"] = sum(p.numel() for p in tp_model.parameters()) / params
        with torch.no_grad():
            row["tp_err"] = _rel_err(ref, tp_model(x))
        if row["tp_err"] >= TOLERANCE and row["tp_err"] != float("inf"):
            row["tp_err64"] = _err_in_double(model, tp_model, x)
    except Exception as exc:
        row["tp_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


# --- the driver -----------------------------------------------------------------------
def family(name: str) -> str:
    """A timm model's family: its name up to the first digit or underscore."""
    return re.split(r"[_\d]", name, maxsplit=1)[0] or name


def sample(count: int, seed: int, everything: bool) -> List[str]:
    """timm model names, round-robin across families in a seeded order (BatchNorm is checked
    per model; models without it are recorded as such and not counted)."""
    import timm
    names = sorted(timm.list_models())
    if everything:
        return names
    rng = random.Random(seed)
    by_family: Dict[str, List[str]] = defaultdict(list)
    for name in names:
        by_family[family(name)].append(name)
    for members in by_family.values():
        rng.shuffle(members)
    order = sorted(by_family)
    rng.shuffle(order)
    picked: List[str] = []
    while any(by_family.values()):  # the driver stops at ``count`` models with BatchNorm
        for fam in order:
            if by_family[fam]:
                picked.append(by_family[fam].pop())
    return picked


def _done(path: Path) -> Dict[str, Dict[str, Any]]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["model"]] = row
    return rows


def _with_bn(rows: Dict[str, Dict[str, Any]]) -> int:
    return sum(1 for r in rows.values() if r.get("error") != "no BatchNorm" and r["model"] not in YOLO)


def drive(args: argparse.Namespace) -> None:
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = YOLO + sample(args.count, args.seed, args.all)
    for name in names:
        done = _done(path)
        if not args.all and name not in YOLO and _with_bn(done) >= args.count:
            break
        if name in done:
            continue
        start = time.perf_counter()
        if name not in YOLO and not has_batchnorm(name):  # no child process for these
            row: Dict[str, Any] = {"model": name, "error": "no BatchNorm"}
        else:
            row = _child(name, args)
        row["wall"] = round(time.perf_counter() - start, 1)
        with path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(_line(row), flush=True)


def _child(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Measure one model in its own process, under the time limit."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--size", str(args.size)],
                              capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stages = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("stage: ")]
        partial = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("partial: ")]
        if partial:  # dnnshrink finished; Torch-Pruning did not
            return {**json.loads(partial[-1]), "tp_error": f"over the {args.timeout} s limit"}
        return {"model": name, "error": f"over the {args.timeout} s limit (in {stages[-1] if stages else 'start-up'})"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"model": name, "error": f"crashed: {proc.stderr[-300:]}"}


def _line(row: Dict[str, Any]) -> str:
    def fmt(prefix: str) -> str:
        if f"{prefix}_error" in row:
            return f"{prefix}: {row[prefix + '_error'][:60]}"
        if f"{prefix}_kept" not in row:
            return f"{prefix}: -"
        exact = "exact" if row[f"{prefix}_err"] < TOLERANCE else f"err {row[prefix + '_err']:.1e}"
        return f"{prefix}: {row[prefix + '_kept']:.2f}x {exact} {row.get(prefix + '_seconds', 0):.1f}s"
    if "error" in row:
        return f"{row['model']:<40} {row['error'][:80]}"
    traced = row.get("ds_traced", "")
    return f"{row['model']:<40} [{traced}] {fmt('ds')} | {fmt('tp')}"


def table(path: Path) -> str:
    """A markdown summary and the per-model rows of what ``path`` holds."""
    rows = [r for r in _done(path).values() if r.get("error") != "no BatchNorm"]
    measured = [r for r in rows if "error" not in r]

    def err(r: Dict[str, Any], prefix: str) -> float:
        """The error in float32, or in float64 where float32 rounding was amplified past the tolerance."""
        value = r.get(f"{prefix}_err", float("inf"))  # a pruned model that no longer runs has none
        return min(value, r.get(f"{prefix}_err64", value))

    def count(prefix: str, pred: Any) -> int:
        return sum(1 for r in measured if f"{prefix}_kept" in r and pred(r))

    def goal(prefix: str) -> int:
        return count(prefix, lambda r: err(r, prefix) < TOLERANCE and r[f"{prefix}_kept"] < 0.9)

    def median(prefix: str) -> str:
        vals = sorted(r[f"{prefix}_kept"] for r in measured if f"{prefix}_kept" in r and err(r, prefix) < TOLERANCE)
        return f"{vals[len(vals) // 2]:.2f}x" if vals else "-"
    out = [f"{len(rows)} models with BatchNorm attempted, {len(measured)} measured "
           f"({len(rows) - len(measured)} over the limit or failing to build/run before either tool).", "",
           "| | dnnshrink | Torch-Pruning |", "|---|---|---|",
           f"| ran | {count('ds', lambda r: True)} | {count('tp', lambda r: True)} |",
           f"| exact (rel. err. < 1e-4) | {count('ds', lambda r: err(r, 'ds') < TOLERANCE)} | "
           f"{count('tp', lambda r: err(r, 'tp') < TOLERANCE)} |",
           f"| exact and < 0.9x params | {goal('ds')} | {goal('tp')} |",
           f"| median params kept (exact ones) | {median('ds')} | {median('tp')} |",
           f"| failed with an error | {sum(1 for r in measured if 'ds_error' in r)} | "
           f"{sum(1 for r in measured if 'tp_error' in r)} |",
           f"| traced by running (fx failed) | {sum(1 for r in measured if r.get('ds_traced') == 'recorded')} | |",
           "", "| model | input | traced | dnnshrink kept | exact | s | returns | TP kept | exact | s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["model"]):
        if "error" in r:
            out.append(f"| {r['model']} | | | {r['error'][:70]} | | | | | | |")
            continue

        def cells(prefix: str) -> List[str]:
            if f"{prefix}_error" in r:
                return [r[f"{prefix}_error"][:60].replace("|", "/"), "no", ""]
            exact = "yes" if r[f"{prefix}_err"] < TOLERANCE else "yes (float64)" if err(r, prefix) < TOLERANCE \
                else f"{err(r, prefix):.0e}"
            return [f"{r[prefix + '_kept']:.2f}x", exact,
                    f"{r.get(prefix + '_seconds', 0):.1f}"]
        ds_cells, tp_cells = cells("ds"), cells("tp")
        out.append(f"| {r['model']} | {r['input'][-1]} | {r.get('ds_traced', '')} | " + " | ".join(ds_cells[:3])
                   + f" | {r.get('ds_returns', '')} | " + " | ".join(tp_cells) + " |")
    why = [r for r in measured if "ds_kept" in r and (r["ds_kept"] >= 0.9 or r["ds_err"] >= TOLERANCE)]
    if why:
        out += ["", "Why these keep 0.9x or more, or are not exact (`reach`: the share of the parameters in "
                "channels that BatchNorm can remove at all; killing half of them leaves about 1 - reach/2):", "",
                "| model | dnnshrink kept | rel. err. (float32) | float64 | reach "
                "| why channels with a BatchNorm are kept |",
                "|---|---|---|---|---|---|"]
        for r in sorted(why, key=lambda r: r["model"]):
            reasons = "; ".join(r.get("held_why", [])).replace("|", "/") or "-"
            f64 = f"{r['ds_err64']:.0e}" if "ds_err64" in r else "-"
            out.append(f"| {r['model']} | {r['ds_kept']:.2f}x | {r['ds_err']:.0e} | {f64} | {r.get('reach', '-')} "
                       f"| {reasons} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=150, help="timm models with BatchNorm in the sample")
    parser.add_argument("--all", action="store_true", help="every timm model, not a sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96, help="input side (or the model's minimum/fixed size)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="print the summary of --out and stop")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.size)))
    elif args.table:
        print(table(Path(args.out)))
    else:
        drive(args)


if __name__ == "__main__":
    main()
