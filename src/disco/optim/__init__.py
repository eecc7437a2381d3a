"""Optimizers: ``Disco``, ``Muon``, ``Scion``, ``Dion``, ``Dion2``, ``NorMuon``, ``PolarGrad``, ``AdaMuon`` (and their
element-wise groups).

Importing registers them."""

from . import builders as _builders  # noqa: F401  (registers the optimizers with the training CLI)
from .adamuon import AdaMuon
from .base import SpectralOptimizer
from .dion import Dion, DionMixedPrecisionConfig
from .dion2 import Dion2
from .disco import Disco
from .muon import Muon
from .muonbp import MuonBP
from .normuon import NorMuon
from .polargrad import PolarGrad
from .scion import Scion

__all__ = [
    "AdaMuon",
    "Dion",
    "Dion2",
    "DionMixedPrecisionConfig",
    "Disco",
    "Muon",
    "MuonBP",
    "NorMuon",
    "PolarGrad",
    "Scion",
    "SpectralOptimizer",
]
