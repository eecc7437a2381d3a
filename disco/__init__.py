"""Disco: distributed spectral-conditioned optimizers (Muon, Scion, Dion, Disco) for PyTorch."""

__version__ = "0.1.0"
