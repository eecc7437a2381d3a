"""Metrics files, the summary table, ``summary.json`` and the loss plot."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

SUMMARY_KEYS = ("lr", "final_train_loss", "final_val_loss", "steps", "wall_s", "tokens_per_s")
#: the optimizer the others are measured against, when it ran
REFERENCE = "adamw"
#: ``summary.json`` key: the first evaluation step at which an optimizer reached the reference's final val loss
STEPS_TO = f"steps_to_{REFERENCE}_val_loss"


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


def steps_to_reach(path: Path, target: float) -> int | None:
    """The first logged step whose ``val_loss`` is at most ``target`` (None if none is)."""
    if not path.exists():
        return None
    return next((int(r["step"]) for r in read_metrics(path) if "val_loss" in r and r["val_loss"] <= target), None)


def add_steps_to_reference(results: dict[str, dict[str, Any]], out: Path, reference: str = REFERENCE) -> None:
    """Set ``steps_to_<reference>_val_loss`` in every row when ``reference`` ran: the first evaluation step at
    which that optimizer's validation loss reached the reference's final one (read from ``metrics.jsonl``, so
    it is as fine as ``--eval-every``). Without the reference the key is absent."""
    if reference not in results:
        return
    target = results[reference]["final_val_loss"]
    for name, r in results.items():
        r[STEPS_TO] = steps_to_reach(out / name / "metrics.jsonl", target)


def machine() -> dict[str, Any]:
    """What produced the numbers: CPU model and cores, torch, and the compute dtype that Disco's
    orthogonalization picks by default here (bf16 on CPUs that multiply it natively, else fp32), which moves the
    losses in the third decimal between machines."""
    import platform

    import torch

    from disco.ops.orthogonalize import cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_compute_dtype": "bfloat16" if cpu_has_native_bf16() else "float32",
    }


def _steps_cell(r: dict[str, Any], ref_steps: int) -> str:
    got = r.get(STEPS_TO)
    if got is None:
        return "not reached"
    return f"{got} ({got / ref_steps:.2f}x)" if ref_steps else str(got)


def format_table(results: dict[str, dict[str, Any]], cfg: Any = None, about: dict[str, Any] | None = None) -> str:
    """The final comparison: lr, final train / val loss, steps to AdamW's final val loss (when AdamW ran),
    tokens/s. With ``cfg`` (a ``TrainConfig``) a footnote says what the columns are; with ``about``
    (:func:`machine` plus the run's ``threads`` / ``layout`` / ``device``) which machine produced them."""
    with_ref = any(STEPS_TO in r for r in results.values())
    ref_steps = results[REFERENCE]["steps"] if with_ref else 0
    ref_col = f"steps to {REFERENCE} val"
    head = f"{'optimizer':<12}{'lr':>8}{'train loss':>12}{'val loss':>10}"
    head += f"{ref_col:>22}" if with_ref else ""
    head += f"{'steps':>7}{'wall s':>9}{'tokens/s':>10}"
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        row = f"{name:<12}{r['lr']:>8g}{r['final_train_loss']:>12.4f}{r['final_val_loss']:>10.4f}"
        row += f"{_steps_cell(r, ref_steps):>22}" if with_ref else ""
        rows.append(row + f"{r['steps']:>7d}{r['wall_s']:>9.1f}{r['tokens_per_s']:>10.0f}")
    notes = []
    if cfg is not None:
        batches = f"{cfg.eval_batches} fixed batch{'es' if cfg.eval_batches > 1 else ''}"
        notes.append(
            f"train loss, val loss: mean cross-entropy (nats per byte) of the final model on {batches} of"
            f" {cfg.batch_size} x {cfg.seq_len} bytes from the training and the validation split, the same for every"
            " optimizer (not the last step's batch loss)."
        )
        if with_ref:
            notes.append(
                f"steps to {REFERENCE} val: the first evaluation (every {cfg.eval_every or cfg.steps} steps) at which"
                f" the validation loss reached {REFERENCE}'s final one, and that over {REFERENCE}'s steps."
            )
        notes.append("wall s: the whole run, evaluations included; tokens/s: training steps only.")
    if about:
        notes.append(
            f"Machine: {about['cpu']} ({about['cores']} cores), torch {about['torch']}, {about.get('threads', '?')}"
            f" thread(s) per process, {about.get('layout', '1 process')} on {about.get('device', 'cpu')}; Disco's"
            f" default compute dtype on this CPU: {about['cpu_compute_dtype']} (the losses move in the third decimal"
            " with it: DISCO_CPU_BF16=0|1 picks)."
        )
    return "\n".join([*rows, *textwrap.wrap(" ".join(notes), width=len(head) + 30)])


def write_summary(
    out: Path, results: dict[str, dict[str, Any]], about: dict[str, Any] | None = None, command: str | None = None
) -> Path:
    """``summary.json``: ``results`` (per optimizer: :data:`SUMMARY_KEYS`, and the steps to AdamW's final val
    loss when AdamW ran), ``machine`` (``about``) and the ``command`` that ran."""
    path = out / "summary.json"
    clean = {name: {k: r[k] for k in (*SUMMARY_KEYS, STEPS_TO) if k in r} for name, r in results.items()}
    data: dict[str, Any] = {"results": clean}
    if about is not None:
        data["machine"] = about
    if command is not None:
        data["command"] = command
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def loss_figure(out: Path, names: list[str], title: str = "") -> Any:
    """Train (thin) and validation (markers) loss against step, one colour per optimizer; integer step ticks.
    Returns the matplotlib figure (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_title(cfg: Any, names: list[str]) -> str:
    """``GPT dim 128 x 4 layers, batch 16 x 128, 300 steps: adamw, muon, disco``."""
    m = cfg.model
    return (
        f"GPT dim {m.dim} x {m.n_layers} layers, batch {cfg.batch_size} x {cfg.seq_len}, {cfg.steps} steps:"
        f" {', '.join(names)}"
    )


def plot_losses(out: Path, names: list[str], title: str = "") -> Path | None:
    """``loss.png`` (:func:`loss_figure`); None when matplotlib is not installed."""
    fig = loss_figure(out, names, title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
