"""`build.py explain`: every rule in effect, with reason and evidence, and every
place the lock departs from what the upstream packages declare. Offline: the
departures come from lock.toml."""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..errors import KtenvError
from ..spec import Spec
from ..spec import inputs as spec_inputs
from . import model


def report(spec: Spec, arch_name: str, stack: str | None, directory: Path) -> dict:
    arch = spec.arch(arch_name)
    inputs = spec_inputs(spec, arch_name, stack)
    lock = None
    stale = None
    try:
        lock = model.read(directory)
        model.check(directory, inputs)
    except KtenvError as e:
        stale = str(e)
    departures = [d.as_dict() for d in lock.departures] if lock else []
    effective = {d["rule"] for d in departures}
    rule_rows = []
    for r in spec.rules:
        if r.id not in inputs.rules:
            continue
        rule_rows.append({
            "id": r.id,
            "kind": r.kind,
            "packages": list(r.touches()),
            "spec": str(r.spec) if r.spec is not None else (r.with_ or ""),
            "stack": str(r.stack),
            "where": r.where,
            "reason": r.reason,
            "evidence": list(r.evidence),
            "departures": sum(1 for d in departures if d["rule"] == r.id),
            "in_lock": r.id in effective,
        })
    not_applied = [{"id": r.id, "stack": str(r.stack), "archs": list(r.archs)} for r in spec.rules if r.id not in inputs.rules]
    return {
        "arch": arch.name,
        "title": arch.title,
        "compute_capability": arch.compute_capability,
        "validated": arch.validated,
        "stack": inputs.stack_version,
        "paths": arch.paths,
        "notes": list(arch.notes),
        "env": inputs.env,
        "lock": str(directory),
        "lock_state": "missing" if lock is None else ("stale" if stale else "up to date"),
        "lock_problem": stale,
        "lockstep": lock.lockstep if lock else {},
        "rules": rule_rows,
        "rules_not_applied": not_applied,
        "departures": departures,
    }


def render(rep: dict) -> str:
    out = [f"{rep['arch']} - {rep['title']} (compute capability {rep['compute_capability']}, "
           f"{'validated' if rep['validated'] else 'not validated end-to-end'}), stack {rep['stack']}"]
    out.append("  dispatch: " + ", ".join(f"{k} -> {v}" for k, v in rep["paths"].items()))
    for n in rep["notes"]:
        out.append(f"  note: {n}")
    out.append("  env: " + " ".join(f"{k}={v}" for k, v in sorted(rep["env"].items())))
    out.append(f"  lock: {rep['lock']}/ ({rep['lock_state']})")
    if rep["lock_problem"] and rep["lock_state"] != "up to date":
        out.append(textwrap.indent(rep["lock_problem"], "    "))
    out.append("")
    out.append(f"Rules in effect ({len(rep['rules'])}):")
    wrap = textwrap.TextWrapper(width=96, initial_indent="      ", subsequent_indent="      ")
    for r in rep["rules"]:
        spec = f" {r['spec']}" if r["spec"] else ""
        out.append(f"  {r['id']}: {r['kind']} {' = '.join(r['packages'])}{spec}   [{r['where']}, stack {r['stack']}]")
        out.extend(wrap.wrap("why: " + r["reason"]))
        out.extend(wrap.wrap("evidence: " + "; ".join(r["evidence"])))
        if rep["lock_state"] != "missing" and not r["in_lock"]:
            out.append("      in this lock: breaks no declared requirement (upstream already agrees, or it only narrows a choice)")
    if rep["rules_not_applied"]:
        out.append("  not applied here: " + ", ".join(f"{r['id']} (stack {r['stack']})" for r in rep["rules_not_applied"]))
    out.append("")
    if rep["lock_state"] == "missing":
        out.append("Departures: no lock yet; run `python build.py lock --arch %s`." % rep["arch"])
    else:
        out.append(f"Departures from what upstream declares ({len(rep['departures'])}):")
        for d in rep["departures"]:
            out.append(f"  {d['package']}: {d['declared_by']} declares {d['declared']}; the lock has {d['locked']}   <- rule {d['rule']}")
    if rep["lockstep"]:
        out.append("Chosen together: " + ", ".join(f"{k}=={v}" for k, v in sorted(rep["lockstep"].items())))
    return "\n".join(out)
