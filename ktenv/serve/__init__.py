"""Serve: the server command sized to the host (launch)."""
