"""Element-wise updates for the parameters that are not matrices: AdamW, Lion, signSGD with momentum.

They act on local pieces only (every op is element-wise), so sharded parameters need no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..distributed.engine import local_piece


def init_state(algorithm: str, p: Tensor) -> dict[str, Tensor]:
    def z() -> Tensor:
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    if algorithm == "adamw":
        return {"step": torch.zeros((), dtype=torch.float32), "exp_avg": z(), "exp_avg_sq": z()}
    if algorithm == "lion":
        return {"exp_avg": z()}
    return {"momentum_buffer": z()}


def adamw(p: Tensor, g: Tensor, state: dict[str, Tensor], s: Any) -> None:
    r"""AdamW (Loshchilov & Hutter): ``m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g^2;
    p <- (1 - lr wd) p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``."""
    b1, b2 = s.betas
    lr, wd, eps = s.lr, s.weight_decay, s.adam_eps
    state["step"] += 1
    # Compiled, the count stays a tensor (as in torch.optim.AdamW): a float read from it would break the graph
    # and come back as a symbolic input that torch 2.13's inductor bakes in at its first value (contract.Constant).
    t: float | Tensor = state["step"].double() if torch.compiler.is_compiling() else float(state["step"])
    m, v = local_piece(state["exp_avg"]), local_piece(state["exp_avg_sq"])
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if wd:
        p.mul_(1 - lr * wd)
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    step_size = lr / (1 - b1**t)
    if isinstance(step_size, Tensor):
        p.sub_(m / denom * step_size)
    else:
        p.addcdiv_(m, denom, value=-step_size)


def lion(p: Tensor, g: Tensor, state: dict[str, Tensor], s: Any) -> None:
    r"""Lion (Chen et al., 2023): ``p <- (1 - lr wd) p - lr sign(lerp(m, g, 1-b1)); m <- lerp(m, g, 1-b2)``."""
    b1, b2 = s.betas
    lr, wd = s.lr, s.weight_decay
    m = local_piece(state["exp_avg"])
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(torch.sign(m.lerp(g, 1 - b1)), alpha=-lr)
    m.lerp_(g, 1 - b2)


def sign(p: Tensor, g: Tensor, state: dict[str, Tensor], s: Any) -> None:
    r"""signSGD with EMA momentum: ``m <- lerp(m, g, 1-beta); p <- (1 - lr wd) p - lr sign(m)``."""
    lr, wd, beta = s.lr, s.weight_decay, s.momentum
    m = local_piece(state["momentum_buffer"])
    m.lerp_(g, 1 - beta)
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(torch.sign(m), alpha=-lr)


#: ``step(local param, local grad, state, settings)``: one update, in place (settings: the rule's dataclass).
Step = Callable[[Tensor, Tensor, dict[str, Tensor], Any], None]

STEPS: dict[str, Step] = {"adamw": adamw, "lion": lion, "sign": sign}


@torch.no_grad()
def step(algorithm: str, p: Tensor, grad: Tensor, state: dict[str, Tensor], settings: Any) -> None:
    """Update ``p`` in place; ``grad`` is the local gradient, already laid out like ``p``."""
    STEPS[algorithm](local_piece(p), grad, state, settings)
