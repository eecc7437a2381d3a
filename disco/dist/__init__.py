"""Disco dist."""
