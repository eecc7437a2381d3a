"""Disco optim."""
