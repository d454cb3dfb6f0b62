"""Standalone scripts run with an environment's own Python (never imported by ktenv)."""
