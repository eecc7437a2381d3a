"""Disco: distributed spectral-conditioned optimizers (Muon, Scion, Disco) for PyTorch."""

from .groups import create_disco_param_groups, routing_table
from .optim import AdaMuon, Dion, Dion2, Disco, Muon, MuonBP, NorMuon, PolarGrad, QKClip, Scion

__version__ = "0.1.0"
__all__ = [
    "AdaMuon",
    "Dion",
    "Dion2",
    "Disco",
    "Muon",
    "MuonBP",
    "NorMuon",
    "PolarGrad",
    "QKClip",
    "Scion",
    "create_disco_param_groups",
    "routing_table",
]
