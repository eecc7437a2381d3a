"""Optimizers: ``Disco``, ``Muon``, ``Scion``, ``Dion``, ``Dion2``, ``NorMuon`` (and their element-wise groups).

Importing registers them."""

from . import builders as _builders  # noqa: F401  (registers the optimizers with the training CLI)
from .base import SpectralOptimizer
from .dion import Dion, DionMixedPrecisionConfig
from .dion2 import Dion2
from .disco import Disco
from .muon import Muon
from .normuon import NorMuon
from .scion import Scion

__all__ = ["Dion", "Dion2", "DionMixedPrecisionConfig", "Disco", "Muon", "NorMuon", "Scion", "SpectralOptimizer"]
