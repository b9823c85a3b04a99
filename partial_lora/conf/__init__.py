"""Hydra config tree (a package so Hydra finds it from an installed wheel too)."""
