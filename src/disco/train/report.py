"""Metrics files, the summary table, ``summary.json`` and the loss plot."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

SUMMARY_KEYS = ("final_train_loss", "final_val_loss", "steps", "wall_s", "tokens_per_s")


class MetricsLog:
    """Appends one JSON object per line to ``<out>/<optimizer>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> int:
        """On resume: drop the lines of steps the checkpoint does not cover (they are trained again); returns
        how many. The lines up to ``step`` stay, and the resumed run appends after them."""
        if not (self.enabled and self.path.exists()):
            return 0
        rows = read_metrics(self.path)
        keep = [r for r in rows if r["step"] <= step]
        if len(keep) < len(rows):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        return len(rows) - len(keep)

    def reset(self) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(results: dict[str, dict[str, Any]], cfg: Any = None) -> str:
    """The final comparison; with ``cfg`` (a ``TrainConfig``), a footnote says what the losses are."""
    head = f"{'optimizer':<12}{'train loss':>12}{'val loss':>10}{'steps':>7}{'wall s':>9}{'tokens/s':>11}"
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        rows.append(
            f"{name:<12}{r['final_train_loss']:>12.4f}{r['final_val_loss']:>10.4f}{r['steps']:>7d}"
            f"{r['wall_s']:>9.1f}{r['tokens_per_s']:>11.0f}"
        )
    if cfg is not None:
        batches = f"{cfg.eval_batches} fixed batch{'es' if cfg.eval_batches > 1 else ''}"
        rows += textwrap.wrap(
            f"train loss, val loss: mean cross-entropy (nats per byte) of the final model on {batches} of"
            f" {cfg.batch_size} x {cfg.seq_len} bytes from the training and the validation split, the same for every"
            " optimizer (not the last step's batch loss). wall s: the whole run, evaluations included;"
            " tokens/s: training steps only.",
            width=len(head) + 40,
        )
    return "\n".join(rows)


def write_summary(out: Path, results: dict[str, dict[str, Any]]) -> Path:
    path = out / "summary.json"
    clean = {name: {k: r[k] for k in SUMMARY_KEYS} for name, r in results.items()}
    path.write_text(json.dumps({"results": clean}, indent=2) + "\n")
    return path


def plot_losses(out: Path, names: list[str]) -> Path | None:
    """Train (thin) and validation (markers) loss against step, one colour per optimizer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        path = out / name / "metrics.jsonl"
        if not path.exists():
            continue
        rows, color = read_metrics(path), f"C{i}"
        train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=0.8, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.5, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
