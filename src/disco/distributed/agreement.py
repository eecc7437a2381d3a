"""Agreement: every rank takes the same step, or every rank raises the same error, within one collective.

Each check is one small collective, and whatever one rank saw (a local error, a missing gradient, a non-finite
value, an exception inside the math) becomes data in it, so no rank leaves a collective sequence while the others
wait in it: the error reaches every rank at once, not at the process-group timeout.

* ``check_step``: before anything moves — gradient presence, non-finite gradients, a digest of the settings,
  local errors (one ``all_reduce`` of ``2n + 5`` integers);
* ``settle``: after a ``map`` — which tensors failed (an exception or a non-finite result) on their owner, and
  whether any rank already handed results over (one ``all_reduce`` of one integer per tensor, plus one); the
  error text travels only when something failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class StepError(RuntimeError):
    """The step cannot be taken; raised alike on every rank, before any parameter or state changed.

    ``nonfinite``: indices of the tensors whose gradient or result is not finite (on some rank); ``failed``:
    indices whose computation raised. A step with only ``nonfinite`` tensors may be skipped (``nonfinite="skip"``).
    ``applied``: with ``commit="streaming"`` groups, the indices this rank had already committed when the
    failure came (empty otherwise: nothing changed). ``consumed``: raised by ``settle`` after some rank had
    handed results to ``Job.consume`` (the same on every rank).
    """

    def __init__(
        self,
        message: str,
        *,
        nonfinite: Sequence[int] = (),
        failed: Sequence[int] = (),
        applied: Sequence[int] = (),
        consumed: bool = False,
    ) -> None:
        super().__init__(message)
        self.nonfinite = list(nonfinite)
        self.failed = list(failed)
        self.applied = list(applied)
        self.consumed = consumed


def digest(obj: Any) -> int:
    """A digest of ``repr(obj)`` that is equal across processes (``hash`` of strings is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little", signed=True)


def first_difference(everyone: list[Any], ranks: Sequence[int]) -> str:
    """Where the ranks' lists first differ, with each rank's value there."""
    longest = max(len(x) for x in everyone)
    for pos in range(longest):
        vals = [x[pos] if pos < len(x) else "<missing>" for x in everyone]
        if len(set(map(str, vals))) > 1:
            shown = "; ".join(f"rank {r}: {v}" for r, v in zip(ranks, vals))
            return f"item {pos} differs: {shown}"
    return "lengths differ: " + ", ".join(f"rank {r}: {len(x)}" for r, x in zip(ranks, everyone))


def _gather_objects(obj: Any, group: ProcessGroup | None, n: int) -> list[Any]:
    everyone: list[Any] = [None] * n
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def check_step(
    group: ProcessGroup | None,
    ranks: Sequence[int],
    names: Sequence[str],
    present: Sequence[bool],
    nonfinite: Sequence[bool],
    settings: Sequence[str],
    error: str | None,
) -> list[int]:
    """Agree before a step; return the indices whose gradient is non-finite on some rank.

    ``nonfinite`` may be longer than ``present``: the extra entries are flags of the caller's own (a vote such
    as "this rank recomputes", ``disco.optim.overlap``), OR-ed over the ranks like the others and returned as
    indices ``>= len(present)``; every rank must pass the same length.

    Raises ``StepError`` (a rank's local ``error``) or ``RuntimeError`` (gradients present on some ranks only;
    settings that differ, naming the first difference and its value on each rank), the same on every rank.
    """
    n = len(ranks)
    d = digest(tuple(settings)) & ((1 << 40) - 1)
    parts = [d & 0xFFFFF, d >> 20]  # two 20-bit parts: n * sum(x^2) == sum(x)^2 iff all ranks hold the same x
    head = [1 if error else 0, parts[0], parts[0] ** 2, parts[1], parts[1] ** 2]
    vec = torch.tensor([*head, *(int(p) for p in present), *(int(x) for x in nonfinite)], dtype=torch.int64)
    dist.all_reduce(vec, group=group)
    total = vec.tolist()
    if total[0]:
        msgs = _gather_objects(error, group, n)
        shown = "; ".join(f"rank {r}: {m}" for r, m in zip(ranks, msgs) if m)
        raise StepError(f"step refused on {total[0]} of {n} ranks: {shown}")
    counts = total[5 : 5 + len(present)]
    bad = [i for i, c in enumerate(counts) if c not in (0, n)]
    if bad:
        listed = ", ".join(f"{names[i]} ({counts[i]}/{n} ranks)" for i in bad[:8])
        raise RuntimeError(
            f"gradients present on some ranks and missing on others for: {listed}; every rank must produce "
            "a gradient for a parameter, or none must"
        )
    if n * total[2] != total[1] ** 2 or n * total[4] != total[3] ** 2:
        everyone = _gather_objects(list(settings), group, n)
        raise RuntimeError("ranks disagree on the optimizer's settings: " + first_difference(everyone, ranks))
    flags = total[5 + len(present) :]
    return [i for i, c in enumerate(flags) if c]


class Outcomes:
    """What went wrong inside one ``map`` on this rank: exceptions and non-finite results, by job position."""

    def __init__(self) -> None:
        self.failed: dict[int, str] = {}
        self.nonfinite: set[int] = set()
        self.consumed = False  # a result was handed to ``Job.consume`` (``engine.handed``)

    def record(self, positions: Sequence[int], result: Tensor) -> None:
        """Flag the members of a result stack that hold a NaN or an infinity.

        A sum is non-finite iff an entry is (or the sum overflows, which results of a bounded LMO never reach): one
        pass instead of ``isfinite().all()``'s four. bf16 has fp32's range, so its sum stays in bf16 (``dtype=``
        would first copy the whole stack to fp32); only fp16's sum (65504 at most) is taken in fp32."""
        if result.numel() == 0:
            return
        flat = result.reshape(result.shape[0], -1)
        acc = torch.float32 if flat.dtype == torch.float16 else None
        ok = torch.isfinite(flat.sum(dim=1, dtype=acc)).tolist()
        self.nonfinite.update(k for k, fine in zip(positions, ok) if not fine)

    def ok(self, position: int) -> bool:
        """Nothing went wrong for the job at ``position`` (so far, on this rank)."""
        return position not in self.failed and position not in self.nonfinite

    def fail(self, positions: Sequence[int], e: BaseException) -> None:
        for k in positions:
            self.failed[k] = f"{type(e).__name__}: {e}"


def settle(
    outcomes: Outcomes,
    group: ProcessGroup | None,
    ranks: Sequence[int],
    indices: Sequence[int],
    names: Sequence[str],
    *,
    collective: bool = True,
) -> None:
    """Raise ``StepError`` on every rank if any rank's ``map`` had a failure (``indices``: job -> tensor index)."""
    codes = [2 if k in outcomes.failed else 1 if k in outcomes.nonfinite else 0 for k in range(len(indices))]
    consumed = outcomes.consumed
    if collective:  # the last entry: whether any rank handed a result to ``Job.consume`` already
        vec = torch.tensor([*codes, int(consumed)], dtype=torch.int64)
        dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
        *codes, flag = vec.tolist()
        consumed = bool(flag)
    if not any(codes):
        return
    failed = [indices[k] for k, c in enumerate(codes) if c == 2]
    nonfinite = [indices[k] for k, c in enumerate(codes) if c == 1]
    text = ""
    if failed:
        mine = {indices[k]: m for k, m in outcomes.failed.items()}
        everyone = _gather_objects(mine, group, len(ranks)) if collective else [mine]
        causes = {i: f"{m} (rank {r})" for r, got in zip(ranks, everyone) for i, m in got.items()}
        text = "; ".join(f"{names[i]}: {causes.get(i, 'failed')}" for i in failed[:8])
        text = f"the computation raised for {text}"
    if nonfinite:
        listed = ", ".join(names[i] for i in nonfinite[:8])
        text += ("; " if text else "") + f"non-finite (NaN / inf) results for {listed}"
    raise StepError(text, nonfinite=nonfinite, failed=failed, consumed=consumed)
