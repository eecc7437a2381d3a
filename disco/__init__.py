"""Disco: distributed spectral-conditioned optimizers (Muon, Scion, Disco) for PyTorch."""

from .groups import create_disco_param_groups, routing_table
from .optim import Dion, Disco, Muon, Scion

__version__ = "0.1.0"
__all__ = ["Dion", "Disco", "Muon", "Scion", "create_disco_param_groups", "routing_table"]
