"""``tqc diff --plot``: per-tensor fidelity along the network, readable at a real model's size.

    x: the tensors both graphs share, evenly spaced in the reference's order, each named ('L3 attn/self/
       Reshape_4') when there are few, else one tick per layer ('L0' ... 'L23')
    y: SQNR (dB) or cosine, scaled to the bulk of the values (Tukey's fences); a tensor outside (an exact
       embedding at 135 dB, an infinite SQNR) sits on the edge as a red triangle with its value written
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tqc.compiler.core.errors import TqcError
from tqc.compiler.tools.diff import DiffResult


_LAYER = re.compile(r"(?:^|[/._])(?:layers?|block|h)[._/]?(\d+)(?=[/._]|$)")
_OUTPUT_SUFFIX = re.compile(r"_output_\d+$|:\d+$")


def short_name(name: str, width: int = 30) -> str:
    """A tensor name for an axis label: '/model/encoder/layer.3/attention/self/Reshape_4_output_0' ->
    'L3 attention/self/Reshape_4' (the layer number first, exporter boilerplate dropped, long tails cut)."""
    layer = _LAYER.search(name)
    rest = _OUTPUT_SUFFIX.sub("", name[layer.end():] if layer else name).strip("/._")
    for boilerplate in ("model/", "encoder/"):
        rest = rest[len(boilerplate):] if rest.startswith(boilerplate) else rest
    for long, short in (("LayerNorm/LayerNormalization", "LayerNorm"), ("attention/", "attn/"),
                        ("intermediate_act_fn/", "act/"), ("intermediate/", "ffn/")):
        rest = rest.replace(long, short)
    prefix, rest = (f"L{layer.group(1)} ", rest) if layer else ("", rest.replace("embeddings/", "emb "))
    room = width - len(prefix)
    return prefix + (rest if len(rest) <= room else "…" + rest[-(room - 1):])


def group_name(name: str) -> str:
    """The block a tensor belongs to, for tick labels: 'L3' for a layer's tensors, else its first name part."""
    layer = _LAYER.search(name)
    if layer:
        return f"L{layer.group(1)}"
    parts = [p for p in _OUTPUT_SUFFIX.sub("", name).split("/") if p and p != "model"]
    return parts[0] if parts else name


@dataclass
class PlotScale:
    """Where the plot's y-axis ends, and what falls outside it (drawn on the edge, marked)."""

    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "PlotScale":
        """Tukey's fences (3 IQR beyond the quartiles) around the finite values: one 135 dB tensor (or an
        exact one) does not squash the 16-35 dB where the model's errors are."""
        finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
        if not finite.size:
            return cls(0.0, 1.0)
        q1, q3 = np.percentile(finite, [25, 75])
        low = max(float(finite.min()), q1 - 3 * (q3 - q1))
        high = min(float(finite.max()), q3 + 3 * (q3 - q1))
        pad = max(0.06 * (high - low), 0.5 if high > 1.5 else 0.002)
        return cls(low - pad, high + pad)

    def clip(self, value: float) -> tuple[float, int]:
        """The value drawn, and -1 / 0 / 1 for below the axis, on it, above it."""
        if value > self.high:
            return self.high, 1
        if value < self.low:
            return self.low, -1
        return value, 0


def draw(results: list[DiffResult], metric: str = "sqnr_db"):
    """The per-tensor figure (matplotlib): one line per candidate along the reference's topological order,
    ticks named after the layers (every tensor when there are few), off-scale points on the edge, marked
    with their values. Returns the figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TqcError("--plot needs matplotlib: pip install 'tqc[plot]'") from None
    names = {r.index: r.name for result in results for r in result.layers}
    x_of = {index: x for x, index in enumerate(sorted(names))}  # evenly spaced, in the reference's order
    rows = {x_of[index]: name for index, name in names.items()}
    positions = sorted(rows)
    if len(positions) <= 48:  # every tensor named
        ticks = [(i, short_name(rows[i])) for i in positions]
    else:  # the first tensor of each layer (or block), named after it
        ticks, last = [], None
        for i in positions:
            group = group_name(rows[i])
            if group != last:
                ticks.append((i, group))
                last = group
        step = max(1, math.ceil(len(ticks) / 64))
        ticks = ticks[::step]
    width = min(30.0, max(11.0, 0.2 * len(ticks) + 3))
    fig, ax = plt.subplots(figsize=(width, 5.2))
    scale = PlotScale.of([getattr(r.metrics, metric) for result in results for r in result.layers])
    off_scale: list[tuple[float, float, float]] = []
    for result in results:
        xs = [x_of[r.index] for r in result.layers]
        drawn = [scale.clip(getattr(r.metrics, metric)) for r in result.layers]
        line, = ax.plot(xs, [y for y, _ in drawn], marker=".", linewidth=1, label=result.candidate)
        for r, (y, side) in zip(result.layers, drawn):
            if side:
                off_scale.append((x_of[r.index], y, getattr(r.metrics, metric)))
        d = result.first_divergence
        if d is not None:
            ax.annotate(f"first divergence\n{short_name(d.name)}", (x_of[d.index], scale.clip(getattr(d.metrics, metric))[0]),
                        fontsize=8, xytext=(8, -28), textcoords="offset points", arrowprops={"arrowstyle": "->"},
                        color=line.get_color())
    if off_scale:
        up = [(x, y) for x, y, v in off_scale if v > scale.high]
        down = [(x, y) for x, y, v in off_scale if v < scale.low]
        for points, marker in ((up, "^"), (down, "v")):
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], linestyle="none", marker=marker,
                        markersize=8, color="crimson", clip_on=False, label="off scale (value written)", zorder=5)
        for x, y, v in off_scale[:12]:
            text = ("inf" if math.isinf(v) else f"{v:.3g}") + (" dB" if metric == "sqnr_db" else "")
            ax.annotate(text, (x, y), fontsize=7, color="crimson", xytext=(6, -10 if v > scale.high else 4),
                        textcoords="offset points", annotation_clip=False)
    ax.set_ylim(scale.low, scale.high)
    ax.set_xticks([i for i, _ in ticks])
    ax.set_xticklabels([label for _, label in ticks], rotation=90, fontsize=7 if len(ticks) > 24 else 8)
    if positions:
        ax.set_xlim(positions[0] - 1, positions[-1] + 1)
    ax.set_xlabel("tensor, in the reference graph's order" + ("" if len(positions) <= 48 else
                                                            " (ticks: the first tensor of each layer)"))
    ax.set_ylabel({"sqnr_db": "SQNR (dB), higher is better", "cosine": "cosine to reference"}[metric])
    ax.set_title("Per-tensor fidelity along the network")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    return fig


def plot(results: list[DiffResult], path: str | Path, metric: str = "sqnr_db") -> None:
    """``draw`` to a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = draw(results, metric)
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
