"""What ``python -m disco sweep`` shows: the best lr per (optimizer, depth, width), its drift across widths,
and ``sweep.png``."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Group = tuple[str, int]  # (optimizer, depth)


@dataclass(frozen=True)
class Best:
    """The lowest final val loss of one (optimizer, depth, width) over its lrs; ``edge`` says whether that lr is
    the grid's smallest (``"low"``) or largest (``"high"``) one, so the true best may lie beyond it."""

    optimizer: str
    depth: int
    width: int
    lr: float
    lr_scale: float
    val_loss: float
    edge: str | None
    runs: int
    diverged: int


def best_lrs(rows: Iterable[dict[str, Any]]) -> dict[Group, list[Best | None]]:
    """Per (optimizer, depth), a ``Best`` per width (narrowest first); ``None`` where every run diverged."""
    cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["optimizer"], r["depth"], r["width"]), []).append(r)
    out: dict[Group, list[Best | None]] = {}
    for (opt, depth, width), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ok = [r for r in runs if not r["diverged"]]
        best = None
        if ok:
            r = min(ok, key=lambda r: (r["final_val_loss"], r["lr"]))
            scales = sorted(x["lr_scale"] for x in runs)
            edge = None
            if len(scales) > 1 and r["lr_scale"] == scales[0]:
                edge = "low"
            elif len(scales) > 1 and r["lr_scale"] == scales[-1]:
                edge = "high"
            diverged = len(runs) - len(ok)
            best = Best(opt, depth, width, r["lr"], r["lr_scale"], r["final_val_loss"], edge, len(runs), diverged)
        out.setdefault((opt, depth), []).append(best)
    return out


def _widths(rows: Iterable[dict[str, Any]]) -> dict[Group, list[int]]:
    widths: dict[Group, set[int]] = {}
    for r in rows:
        widths.setdefault((r["optimizer"], r["depth"]), set()).add(r["width"])
    return {g: sorted(w) for g, w in widths.items()}


def drift(bests: list[Best | None]) -> tuple[float, bool] | None:
    """How far the best lr moves across the widths: (largest / smallest best lr, whether that is only a bound
    because a best lr sits at the grid's edge); ``None`` with fewer than two widths that trained."""
    found = [b for b in bests if b is not None]
    if len(found) < 2:
        return None
    lrs = [b.lr for b in found]
    return max(lrs) / min(lrs), any(b.edge for b in found)


def format_best(rows: list[dict[str, Any]]) -> str:
    """The table ``python -m disco sweep`` prints: best lr per (optimizer, depth, width), then its drift."""
    head = (
        f"{'optimizer':<11}{'depth':>6}{'width':>7}{'best lr':>10}{'x default':>11}{'val loss':>10}"
        f"{'vs narrowest':>14}  note"
    )
    lines = [head, "-" * (len(head) + 20)]
    groups = best_lrs(rows)
    widths = _widths(rows)
    notes = []
    for (opt, depth), bests in groups.items():
        first = next((b for b in bests if b is not None), None)
        for width, b in zip(widths[(opt, depth)], bests):
            if b is None:
                lines.append(f"{opt:<11}{depth:>6}{width:>7}{'-':>10}{'-':>11}{'-':>10}{'-':>14}  every lr diverged")
                continue
            ratio = f"x{b.lr / first.lr:.3g}" if first is not None else "-"
            note = {"low": "at the grid's smallest lr", "high": "at the grid's largest lr"}.get(b.edge or "", "")
            if b.diverged:
                note = ", ".join(filter(None, [note, f"{b.diverged}/{b.runs} diverged"]))
            lines.append(
                f"{opt:<11}{depth:>6}{width:>7}{b.lr:>10.3g}{'x' + format(b.lr_scale, 'g'):>11}{b.val_loss:>10.4f}"
                f"{ratio:>14}  {note}"
            )
        moved = drift(bests)
        if moved is not None:
            ws = [w for w, b in zip(widths[(opt, depth)], bests) if b is not None]
            lrs = " / ".join(f"{b.lr:.3g}" for b in bests if b is not None)
            bound = " (uncertain: a best lr is at the grid's edge, the true one may lie beyond)" if moved[1] else ""
            notes.append(
                f"{opt} (depth {depth}): best lr {lrs} at widths {' / '.join(map(str, ws))}; largest / smallest"
                f" = {moved[0]:.3g}{bound}"
            )
    lines.append("")
    lines += [textwrap.fill(n, width=len(head) + 20, subsequent_indent="  ") for n in notes]
    footnote = (
        "val loss: the final model's mean cross-entropy (nats per byte) on fixed validation batches; a run is"
        " diverged when it is not finite or no better than ln(256)."
    )
    lines.append(textwrap.fill(footnote, width=len(head) + 20))
    return "\n".join(lines)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_sweep(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """``out/sweep.png``: one panel per optimizer (val loss against lr, log x, one curve per width and depth,
    a star at the best lr, an x on top for a diverged run), and a last panel with the best lr against width."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    groups = best_lrs(rows)
    n = len(optimizers) + 1
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.4 * nrows), squeeze=False)
    flat = list(axes.flat)
    ok = [r["final_val_loss"] for r in rows if not r["diverged"]]
    top = max(ok) if ok else 1.0
    bottom = min(ok) if ok else 0.0
    pad = 0.05 * max(top - bottom, 1e-3)
    keys = sorted({(r["depth"], r["width"]) for r in rows})
    depths = sorted({d for d, _ in keys})
    for ax, opt in zip(flat, optimizers):
        for depth, width in keys:
            mine = sorted((r for r in rows if (r["optimizer"], r["depth"], r["width"]) == (opt, depth, width)),
                          key=lambda r: r["lr"])  # fmt: skip
            if not mine:
                continue
            color = f"C{sorted({w for _, w in keys}).index(width) % 10}"
            style = ["-", "--", ":", "-."][depths.index(depth) % 4]
            label = f"width {width}" + (f", depth {depth}" if len(depths) > 1 else "")
            good = [(r["lr"], r["final_val_loss"]) for r in mine if not r["diverged"]]
            if good:
                ax.plot(*zip(*good), style, color=color, marker="o", ms=3, label=label)
            bad = [r["lr"] for r in mine if r["diverged"]]
            if bad:
                ax.plot(bad, [top + pad] * len(bad), "x", color=color)
            best = next((b for b in groups[(opt, depth)] if b is not None and b.width == width), None)
            if best is not None:
                ax.plot([best.lr], [best.val_loss], "*", color=color, ms=11, mec="k", mew=0.5)
        ax.set_xscale("log")
        ax.set_ylim(bottom - pad, top + 2 * pad)
        ax.set_title(opt)
        ax.set_xlabel("lr")
        ax.set_ylabel("final val loss (nats / byte)")
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    ax = flat[len(optimizers)]
    for (opt, depth), bests in groups.items():
        found = [b for b in bests if b is not None]
        if not found:
            continue
        color = f"C{optimizers.index(opt) % 10}"
        label = opt + (f", depth {depth}" if len(depths) > 1 else "")
        style = ["-", "--", ":", "-."][depths.index(depth) % 4]
        ax.plot([b.width for b in found], [b.lr for b in found], style, color=color, marker="o", label=label)
        edges = [b for b in found if b.edge]
        if edges:  # hollow: the best lr of the grid, the true one may lie beyond
            ax.plot([b.width for b in edges], [b.lr for b in edges], "o", ms=9, mfc="none", color=color)
    ax.set_xscale("log", base=2)
    widths = sorted({r["width"] for r in rows})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_title("best lr against width (ring: at the grid's edge)", fontsize=9)
    ax.set_xlabel("width")
    ax.set_ylabel("best lr")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    for extra in flat[n:]:
        extra.axis("off")
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
