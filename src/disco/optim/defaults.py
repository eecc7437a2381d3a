"""Disco's defaults, in one place: the constructor, the routing table, the training CLI's builder and the
TorchTitan integration all read them from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DiscoDefaults:
    """The defaults of :class:`disco.Disco` (and of every group that does not override them).

    Attributes:
        lr: learning rate. Default ``1e-2``.
        momentum: EMA momentum ``beta``. Default ``0.95``.
        nesterov: Nesterov momentum. Default ``True``; ``False`` when ``is_light`` (no separate gradient kept).
        weight_decay: decoupled weight decay. Default ``0.0``.
        eps: added to the Frobenius norm before Newton-Schulz. Default ``1e-7`` (``torch.optim.Muon``'s).
        norm_factor: the layer norm of matrices. Default ``"spectral"`` (``sqrt(fan_out / fan_in)``).
        backend: orthogonalization backend. Default ``"gram_newtonschulz5"`` (Newton-Schulz in Gram form where
            ``n / m > 1.5``, the plain form elsewhere: the same polynomial, 1.3-1.9x less work at aspect 4).
        backend_steps: Newton-Schulz iterations. Default ``5``.
        is_light: keep the momentum in ``p.grad``. Default ``False``.
    """

    lr: float = 1e-2
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0
    eps: float = 1e-7
    norm_factor: str = "spectral"
    backend: str = "gram_newtonschulz5"
    backend_steps: int = 5
    is_light: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DISCO_DEFAULTS = DiscoDefaults()
