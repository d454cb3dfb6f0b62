"""Serve: the server command sized to the host (launch, sizing, weights, model), AMXINT4 conversion (convert, amxint4), the measured kt-kernel variant and method (tune)."""
