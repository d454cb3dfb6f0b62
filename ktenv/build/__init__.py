"""Build: an env from its lock. pipeline.py runs the steps in order; each step is a module beside it."""
