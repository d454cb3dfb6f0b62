"""Serve: the server command sized to the host (launch, sizing, weights, model), AMXINT4 conversion (convert, amxint4)."""
