"""The per-layer report shared by the pipeline and the CLI: channels, MACs, parameters.

MACs are counted by ``torch.utils.flop_counter`` on the real modules (one multiply-add is
two FLOPs), so they include every conv and matmul the network really runs (and the CPU
attention kernel the counter has no formula for).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .cost import uniform_keep
from .fileio import atomic_path, atomic_write
from .tracing import model_mode, normalize_inputs

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class LayerRow:
    """One conv or linear layer before and after shrinking."""

    name: str
    kind: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def kept(self) -> float:
        """Share of output channels kept."""
        return self.out_after / self.out_before if self.out_before else 1.0


@dataclass
class Report:
    """Rows per layer, totals, and any extra figures (score, latency) the caller adds."""

    rows: List[LayerRow]
    totals: Dict[str, int]
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"totals": self.totals, "layers": [asdict(r) for r in self.rows], **self.extra}

    def table(self) -> str:
        """A plain-text table (what ``print(report)`` shows)."""
        head = ("layer", "type", "in", "out", "kept", "MACs", "params")
        lines = [head]
        for r in self.rows:
            lines.append((r.name, r.kind, f"{r.in_before}→{r.in_after}", f"{r.out_before}→{r.out_after}",
                          f"{r.kept:.0%}", f"{_human(r.macs_before)}→{_human(r.macs_after)}",
                          f"{_human(r.params_before)}→{_human(r.params_after)}"))
        t = self.totals
        lines.append(("total", "", "", "", "", f"{_human(t['macs_before'])}→{_human(t['macs_after'])}",
                      f"{_human(t['params_before'])}→{_human(t['params_after'])}"))
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)

    def __str__(self) -> str:
        return self.table()

    def save(self, folder: Path, stem: str = "layers") -> Dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and a bar chart ``<stem>.png`` of channels per layer."""
        folder = Path(folder)
        paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md", "png": folder / f"{stem}.png"}
        with atomic_write(paths["json"], "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        with atomic_write(paths["md"], "w") as f:
            f.write("```\n" + self.table() + "\n```\n")
        self.bar_chart(paths["png"])
        return paths

    def bar_chart(self, path: Path) -> Path:
        """A PNG chart of each layer's output channels before and after: horizontal bars, one
        row per layer in network order, so every name stays readable however deep the net."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.name for r in self.rows]
        height = max(3.0, 0.18 * len(names) + 1.5)
        longest = max((len(n) for n in names), default=4)
        fig, ax = plt.subplots(figsize=(6.0 + 0.06 * longest, height))
        ys = list(range(len(names)))
        ax.barh(ys, [r.out_before for r in self.rows], color="#c8c8c8", label="before")
        ax.barh(ys, [r.out_after for r in self.rows], color="#2b7bba", label="after")
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=7 if len(names) < 60 else 5)
        ax.set_ylim(len(names) - 0.5, -0.5)  # the first layer on top
        ax.set_xlabel("output channels")
        t = self.totals
        ax.set_title(f"MACs {_human(t['macs_before'])} → {_human(t['macs_after'])}, "
                     f"params {_human(t['params_before'])} → {_human(t['params_after'])}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        return path


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU attention kernel: the scores ``q @ kᵀ`` and their weighted sum of ``v``."""
    items = math.prod(query_shape[:-2])
    return 2 * items * query_shape[-2] * key_shape[-2] * (query_shape[-1] + value_shape[-1])


# kernels torch.utils.flop_counter has no formula for: scaled_dot_product_attention on the
# CPU runs this one, and without it a ViT-style block's attention counted zero MACs
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_MISSED_BY_THE_COUNTER = {_CPU_ATTENTION: _cpu_attention_flops} if _CPU_ATTENTION is not None else {}


def count_macs(model: nn.Module, example_inputs: Any) -> Dict[str, int]:
    """MACs per module name (``""`` for the whole model), counted on one eval-mode forward."""
    inputs = normalize_inputs(example_inputs)
    with model_mode(model, training=False), torch.no_grad(), \
            FlopCounterMode(display=False, custom_mapping=_MISSED_BY_THE_COUNTER) as counter:
        model(*inputs)
    macs = {"": counter.get_total_flops() // 2}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key.split(".", 1)[1] if "." in key else ""
        if name:
            macs[name] = sum(ops.values()) // 2
    return macs


def layer_width(m: nn.Module) -> tuple:
    """``(input, output)`` channels (features) of a conv or linear layer."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.in_channels, m.out_channels


def layer_report(model: nn.Module, example_inputs: Any, baseline: Optional[nn.Module] = None) -> Report:
    """The per-layer report of ``model`` against ``baseline`` (default: itself)."""
    baseline = model if baseline is None else baseline
    after_macs = count_macs(model, example_inputs)
    before_macs = after_macs if baseline is model else count_macs(baseline, example_inputs)
    rows = []
    for name, old in baseline.named_modules():
        if not isinstance(old, LAYER_TYPES):
            continue
        try:
            new = model.get_submodule(name)
        except AttributeError:  # gone with a residual branch dropped whole: a row of zeros
            new = None
        (ib, ob) = layer_width(old)
        (ia, oa) = layer_width(new) if new is not None else (0, 0)
        rows.append(LayerRow(name, type(old).__name__, ib, ia, ob, oa, before_macs.get(name, 0),
                             after_macs.get(name, 0), sum(p.numel() for p in old.parameters()),
                             sum(p.numel() for p in new.parameters()) if new is not None else 0))
    totals = {"macs_before": before_macs[""], "macs_after": after_macs[""],
              "params_before": sum(p.numel() for p in baseline.parameters()),
              "params_after": sum(p.numel() for p in model.parameters())}
    return Report(rows, totals)


def uniform_widths(graph: Any, cost: Any, budget: float, min_width: int = 1, multiple: int = 1,
                   steps: int = 40) -> Dict[str, int]:
    """Per group, the width a uniform width multiplier gives at ``budget`` MACs: every group
    keeps the same share of its removable units, the largest share that fits (bisection)."""
    best = uniform_keep(graph, cost, budget, min_width, multiple, steps)
    return {g.name: int(best[g.units].sum()) for g in graph.groups}


def widths_against_uniform(graph: Any, costs: Any, keep: Any, budget: float, min_width: int = 1,
                           multiple: int = 1) -> Dict[str, Dict[str, int]]:
    """Per removable group: its original width, the width the algorithm chose, and the width
    a uniform width multiplier gives at the same budget (so a reader sees where the learned
    structure spends and saves channels)."""
    uniform = uniform_widths(graph, costs.cost, budget, min_width, multiple)
    return {g.name: {"original": int(g.size), "chosen": int(keep[g.units].sum()), "uniform": uniform[g.name]}
            for g in graph.groups if graph.unit_removable[g.units].any()}


def widths_markdown(widths: Dict[str, Dict[str, int]]) -> str:
    """The widths-per-group table of ``report.md``."""
    lines = ["| group | original | chosen | uniform multiplier |", "|---|---:|---:|---:|"]
    for name, w in widths.items():
        lines.append(f"| `{name}` | {w['original']} | {w['chosen']} | {w['uniform']} |")
    return "\n".join(lines)


# --- a shrink run's summary and report.md --------------------------------------------
def widths_text(graph: Any, keep: Any) -> str:
    """The final width of every group, as a Markdown table for TensorBoard's text tab."""
    rows = ["| group | width | kept of |", "|---|---:|---:|"]
    for group in graph.groups:
        if group.removable.any():
            rows.append(f"| {group.name} | {int(keep[group.units].sum())} | {group.size} |")
    return "\n".join(rows)


def summary_table(report: Report) -> str:
    """The baseline-against-shrunk table a run prints at its end."""
    b, s = report.extra["baseline"], report.extra["shrunk"]
    rows = [("", "baseline", "shrunk", "ratio"),
            ("MACs", f"{b['macs']:,}", f"{s['macs']:,}", f"{s['macs'] / max(b['macs'], 1):.2f}"),
            ("params", f"{b['params']:,}", f"{s['params']:,}", f"{s['params'] / max(b['params'], 1):.2f}"),
            ("score", f"{b['score']:.4f}", f"{s['score']:.4f}", f"{s['score'] - b['score']:+.4f}"),
            ("PyTorch ms", f"{b['latency_ms']:.3f}", f"{s['latency_ms']:.3f}",
             f"{s['latency_ms'] / max(b['latency_ms'], 1e-12):.2f}")]
    rows += _resource_rows(report.extra)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    table = "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in rows)
    return table + _legend({r[0] for r in rows}, "\n", ";\n") + profile_note(report.extra, "\n") \
        + speed_note(report.extra, "\n")


# what each latency row of the summary measures: three ways of timing, which differ
LATENCY_ROWS = (("PyTorch ms", "PyTorch ms: the model as trained, eager, on this machine"),
                ("predicted ms", "predicted ms: the latency profile's estimate for its runtime"),
                ("onnxruntime ms", "onnxruntime ms: the exported ONNX, timed as the profile was measured"))


def _legend(labels: set, before: str, between: str = "; ") -> str:
    """What the latency rows among ``labels`` measure, when there is more than one to tell apart."""
    said = [text for label, text in LATENCY_ROWS if label in labels]
    return before + between.join(said) + "." if len(said) > 1 else ""


# predicted over measured beyond this factor (either way): the profile is not of this machine
PROFILE_OFF = 1.5


def profile_note(extra: Dict[str, Any], before: str) -> str:
    """A line when an onnxruntime CPU profile's prediction for the baseline is off the
    measured onnxruntime latency by more than :data:`PROFILE_OFF` (a profile made on another machine,
    or under another load: the shipped one read 1.3-2.1x slow on 32 networks on a host that
    ran faster than the one it was made on), saying what still holds and how to measure this
    machine's; empty otherwise."""
    onnx, predicted = extra.get("onnx_latency", {}), extra.get("resources", {}).get("latency_ms", {})
    if not onnx.get("baseline_ms") or not predicted.get("before"):
        return ""
    runtime = predicted.get("runtime", {})
    if runtime.get("name") != "onnxruntime" or runtime.get("device", "cpu") != "cpu" \
            or runtime.get("threads", onnx.get("threads")) != onnx.get("threads"):
        return ""  # a profile of another runtime (a GPU's, say) predicts what onnxruntime on this CPU does not run
    ratio = predicted["before"] / onnx["baseline_ms"]
    if 1 / PROFILE_OFF <= ratio <= PROFILE_OFF:
        return ""
    off = f"{ratio:.1f}x slower" if ratio > 1 else f"{1 / ratio:.1f}x faster"
    return (f"{before}note: the latency profile predicts the baseline {off} than onnxruntime measured it here: the "
            "profile was made on another machine or under another load, or the network is far from the shapes it "
            "was fitted on (a network this small is mostly the runtime's per-run cost). Targets given as a share of "
            "the baseline rest on its ratios; for this machine's milliseconds, `dnnshrink calibrate --out "
            "my-profile.json` (under a minute) and `profile: my-profile.json`.")


# a cut to at most this share of the MACs that leaves at least SLOW_TIME of the time bought nothing
CUT_MACS, SLOW_TIME = 0.9, 0.95


def speed_note(extra: Dict[str, Any], before: str) -> str:
    """A line when the shrunk network has at most :data:`CUT_MACS` of the baseline's MACs
    but takes at least :data:`SLOW_TIME` of its time (onnxruntime's measurement where the run
    made one, else the profile's prediction): an even cut can leave channel counts off the
    runtime's blocks (RegNetX-400MF at half its MACs measured 0.98 of its baseline's time,
    RegNetY-800MF 1.2, where the capacity step's structures ran at 0.52 and 0.56). Says what
    builds a faster network; empty otherwise."""
    macs = extra.get("shrunk", {}).get("macs", 0) / max(extra.get("baseline", {}).get("macs", 0), 1)
    onnx, predicted = extra.get("onnx_latency", {}), extra.get("resources", {}).get("latency_ms", {})
    if onnx.get("baseline_ms") and onnx.get("shrunk_ms"):
        time, how = onnx["shrunk_ms"] / onnx["baseline_ms"], "as onnxruntime measured it"
    elif predicted.get("before") and predicted.get("after") is not None:
        time, how = predicted["after"] / predicted["before"], "as the latency profile predicts it"
    else:
        return ""
    if macs > CUT_MACS or time < SLOW_TIME:
        return ""
    learning = extra.get("structure_learning", {})
    latency_target = ("a latency target with measure_target: true meets the time itself, measured (target: "
                      "{resource: latency, value: ...})")
    if learning.get("scale") == "capacity":
        fix = latency_target
    elif "capacity_gain" in learning:  # scale: auto weighed the capacity step's structure and kept the multiplier's
        gain, why = float(learning["capacity_gain"]), learning.get("scale_why", "gain")
        if why == "gain" and gain > 0:
            fix = (f"the capacity step's structure was predicted to need only {gain:.1%} less time per MAC "
                   f"(`scale: capacity` takes it anyway); {latency_target}")
        elif why == "budget":  # (the capacity step's structure missed the budget)
            fix = latency_target
        else:
            fix = f"the capacity step's structure would be no faster per MAC; {latency_target}"
    else:
        fix = ("`scale: capacity` (`--scale capacity`) builds the structure that runs fastest at this target, as a "
               "latency target (target: {resource: latency, value: ...}) does by default")
    return (f"{before}note: the shrunk network has {macs:.0%} of the baseline's MACs but takes {time:.0%} of its "
            f"time {how}: a cut can leave channel counts off the runtime's fast kernels (grouped convolutions "
            f"most of all) and buy no time; {fix}.")


def _resource_rows(extra: Dict[str, Any]) -> list:
    """Summary rows for the predicted latency, activations and the measured ONNX latency."""
    rows = []
    res = extra.get("resources", {})
    for key, label in (("activations", "activations"), ("latency_ms", "predicted ms")):
        if key in res:
            b, a = res[key]["before"], res[key]["after"]
            rows.append((label, f"{b:,.3f}" if key == "latency_ms" else f"{b:,.0f}",
                         f"{a:,.3f}" if key == "latency_ms" else f"{a:,.0f}", f"{a / max(b, 1e-12):.2f}"))
    onnx = extra.get("onnx_latency", {})
    if "baseline_ms" in onnx:
        rows.append(("onnxruntime ms", f"{onnx['baseline_ms']:.3f}", f"{onnx['shrunk_ms']:.3f}",
                     f"{onnx['shrunk_ms'] / max(onnx['baseline_ms'], 1e-12):.2f}"))
    return rows


def report_markdown(result: Any) -> str:
    """``report.md`` of a shrink run (a :class:`~dnnshrink_core.pipeline.ShrinkResult`)."""
    learn = result.report.extra["structure_learning"]
    details = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in learn.items()
                        if k not in ("algorithm", "epochs", "target_cost", "cost_unit", "learned_widths",
                                     "widths_per_epoch") and not k.endswith("_macs"))
    widths = result.report.extra.get("widths")
    width_table = ("## Widths per group, against a uniform width multiplier at the same budget\n\n"
                   f"{widths_markdown(widths)}\n\n") if widths else ""
    dropped = result.report.extra.get("blocks_dropped", {})
    blocks = "".join(f"- the branch joined at `{b['join']}`: {', '.join(f'`{n}`' for n in b['layers'])}\n"
                     for b in dropped.get("blocks", []))
    depth = (f"## Whole residual blocks dropped (depth: {dropped.get('depth')})\n\n{blocks}\n") if blocks else ""
    return (f"# dnnshrink report\n\n{_markdown_table(result.report)}\n\n"
            f"Structure learning: `{learn['algorithm']}`, {learn['epochs']} epoch(s), target "
            f"{learn['target_cost']:,.4g} {_target_unit(learn)}" + (f" ({details})" if details else "") + ".\n\n"
            f"{width_table}{depth}## Layers\n\n```\n{result.report.table()}\n```\n")


def _target_unit(learn: Dict[str, Any]) -> str:
    from .target import RESOURCES

    return RESOURCES.get(learn.get("target", {}).get("resource", "macs"), "MACs")


def _markdown_table(report: Report) -> str:
    b, s = report.extra["baseline"], report.extra["shrunk"]
    lines = ["| | baseline | shrunk | ratio |", "|---|---:|---:|---:|"]
    for key, label, fmt in (("macs", "MACs", "{:,}"), ("params", "parameters", "{:,}"), ("score", "score", "{:.4f}"),
                            ("latency_ms", "PyTorch ms", "{:.3f}")):
        ratio = s[key] / b[key] if b[key] else float("nan")
        lines.append(f"| {label} | {fmt.format(b[key])} | {fmt.format(s[key])} | {ratio:.3f} |")
    extra = _resource_rows(report.extra)
    lines += [f"| {label} | {b} | {s} | {ratio} |" for label, b, s, ratio in extra]
    return "\n".join(lines) + _legend({"PyTorch ms"} | {row[0] for row in extra}, "\n\n") \
        + profile_note(report.extra, "\n\n") + speed_note(report.extra, "\n\n")
