"""Serving stage: launch sizing (sizing, weights, model) and AMXINT4 conversion (convert, amxint4)."""
