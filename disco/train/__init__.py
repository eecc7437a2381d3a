"""Disco train."""
