"""Locks: the resolver (uv) over the spec, the departure check, the typed lock model, the conda lock."""
