"""Shared test helpers (fixtures-free functions other test modules import)."""
