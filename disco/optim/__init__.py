"""Optimizers: ``Disco``, ``Muon``, ``Scion``, ``Dion`` (and their element-wise groups); importing registers them."""

from . import builders as _builders  # noqa: F401  (registers the optimizers with the training CLI)
from .base import SpectralOptimizer
from .dion import Dion, DionMixedPrecisionConfig
from .disco import Disco
from .muon import Muon
from .scion import Scion

__all__ = ["Dion", "DionMixedPrecisionConfig", "Disco", "Muon", "Scion", "SpectralOptimizer"]
