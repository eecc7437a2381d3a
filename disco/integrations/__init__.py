"""Disco integrations."""
