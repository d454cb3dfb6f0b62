"""Check: prove an env (smoke tiers, audit) and a host (doctor). Every check that needs the env runs in it (ktenv/probe.py)."""
