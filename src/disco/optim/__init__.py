"""Optimizers: ``Disco``, ``Muon``, ``Scion``, ``Dion``, ``Dion2``, ``NorMuon``, ``PolarGrad``, ``AdaMuon``, ``MuonBP``
(and their element-wise groups), and ``QKClip`` (MuonClip's QK-clip, applied after a step).

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
from .qkclip import AttentionHeads, MaxLogitRecorder, QKClip
from .scion import Scion

__all__ = [
    "AdaMuon",
    "AttentionHeads",
    "Dion",
    "Dion2",
    "DionMixedPrecisionConfig",
    "Disco",
    "MaxLogitRecorder",
    "Muon",
    "MuonBP",
    "NorMuon",
    "PolarGrad",
    "QKClip",
    "Scion",
    "SpectralOptimizer",
]
