"""Norm tracking through the engine: each norm of each parameter and update computed once, on every rank alike.

Norms that decompose over pieces (``rms``: a sum of squares; ``supremum``: a max) come from local pieces and
one coalesced all-reduce per kind over the axes that shard each tensor. The others (spectral norms, row-norm
maxima, the condition number) are mapped through the engine with a ``NormsSpec``: the tensor's owner computes
them from the whole tensor and every holder gets the values (``out="replicated"``). No ``full_tensor()`` call,
no rank repeats another's work, and every rank ends with the same values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..distributed.engine import Engine, Job
from ..ops.specs import VECTOR_NORMS, NormsSpec

DECOMPOSABLE = ("rms", "supremum")


def default_tracked_norms(norm: str, ndim: int) -> tuple[str, ...]:
    """The operator norms logged for a parameter: each LMO's own dual pairing, plus the max entry."""
    if ndim < 2:
        return ("rms", "supremum")
    if norm.startswith("embed"):
        return ("l1_to_rms", "supremum")
    if norm.startswith("unembed"):
        return ("rms_to_inf", "supremum")
    return ("rms_to_rms", "supremum")


@dataclass(frozen=True)
class Tracked:
    """One tensor to measure: ``local`` is this rank's piece of a tensor laid out like parameter ``index``."""

    key: str  # "update" | "param"
    name: str
    index: int
    local: Tensor
    norms: tuple[str, ...]
    transposed: bool = False  # stored fan_in x fan_out: the norms are those of the whole tensor's .mT


def compute_norms(engine: Engine, entries: Sequence[Tracked]) -> dict[str, Tensor]:
    """``{f"track_{key}_{norm}/{name}": value}`` for every entry and norm (vectors: ``rms``, ``supremum`` only)."""
    out: dict[str, Tensor] = {}
    decomposable = DECOMPOSABLE if engine.has_layouts else ()
    sums: list[tuple[str, Tracked]] = []
    maxes: list[tuple[str, Tracked]] = []
    jobs: list[Job] = []
    job_keys: list[list[str]] = []
    for e in entries:
        norms = [n for n in e.norms if e.local.dim() >= 2 or n in VECTOR_NORMS]
        whole = [n for n in norms if n not in decomposable]
        for n in norms:
            if n == "rms" and n in decomposable:
                sums.append((f"track_{e.key}_{n}/{e.name}", e))
            elif n == "supremum" and n in decomposable:
                maxes.append((f"track_{e.key}_{n}/{e.name}", e))
        if whole:
            jobs.append(Job(e.index, e.local, NormsSpec(tuple(whole), transposed=e.transposed)))
            job_keys.append([f"track_{e.key}_{n}/{e.name}" for n in whole])
    if sums:
        vals = [e.local.detach().float().pow(2).sum().reshape(1) for _, e in sums]
        engine.all_reduce(vals, [engine.layout(e.index) for _, e in sums], over="shards", op="sum")
        for (key, e), v in zip(sums, vals):
            numel = math.prod(engine.layout(e.index).shape)
            out[key] = (v[0] / max(numel, 1)).sqrt()
    if maxes:
        vals = [_max_abs(e.local) for _, e in maxes]
        engine.all_reduce(vals, [engine.layout(e.index) for _, e in maxes], over="shards", op="max")
        for (key, _), v in zip(maxes, vals):
            out[key] = v[0]
    if jobs:
        for keys, values in zip(job_keys, engine.map(jobs, out="replicated")):
            for key, v in zip(keys, values):
                out[key] = v.float()
    return out


def _max_abs(t: Tensor) -> Tensor:
    if t.numel() == 0:  # an empty shard: the identity of max over absolute values
        return torch.zeros(1, dtype=torch.float32, device=t.device)
    return t.detach().float().abs().amax().reshape(1)
