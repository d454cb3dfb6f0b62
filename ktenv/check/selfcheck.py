"""Upstream's own self-checks, part of the import tier: kt-kernel's `kt doctor -v`
and `kt version`, sglang's `python -m sglang.check_env`, and the names they read
(probes/selfcheck.py reports what each printed, item by item).

Every warning they give is judged against envs/loaders.toml [[selfcheck]]: a
known false warning from upstream naming (quirk), a note about this machine
(host), a caution another smoke check enforces (covered), or true only for
want of the NVIDIA driver (needs-gpu, reported as such). A warning that
matches no entry fails the tier, with what the tool printed.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from packaging.utils import canonicalize_name

from .result import FAILED, NEEDS_GPU, PASSED, SKIPPED, Context, Result, probe

KIND_LABEL = {"quirk": "known false warnings", "host": "about this host", "covered": "enforced elsewhere"}


def _note(ctx: Context, tool: str, item: str, value: str):
    for n in ctx.spec.knowledge.loaders.selfcheck:
        if n.tool == tool and n.item == item and re.search(n.says, value) and n.known.holds(ctx.target.stack):
            return n
    return None


def _judge(ctx: Context, name: str, tool: str, seen: list[tuple[str, str]], ok_text: str,
           remedy: str = "") -> list[Result]:
    """One result for the tool (passed with its explained warnings, or failed with the rest),
    plus one needs-gpu result per warning that only a GPU host can clear."""
    explained: dict[str, list[str]] = {}
    gpu, bad = [], []
    for item, value in seen:
        n = _note(ctx, tool, item, value)
        if n is None:
            bad.append(f"{item}: {value!r}")
        elif n.kind == "needs-gpu":
            gpu.append(Result("import", f"{tool}: {item}", NEEDS_GPU, f"{tool} says {value!r}: {n.known.reason}",
                              "Run smoke on a machine with the arch's GPU and driver."))
        else:
            explained.setdefault(n.kind, []).append(f"{item} {value!r} ({n.known.reason})")
    notes = "; ".join(f"{KIND_LABEL[k]}: " + ", ".join(v) for k, v in explained.items())
    detail = {"explained": explained, "unexplained": bad}
    if bad:
        return [Result("import", name, FAILED, f"{tool} warns: {'; '.join(bad)}" + (f". Also {notes}" if notes else ""),
                       remedy or ("kt-kernel's and sglang's own checks find something ktenv does not know to be "
                                  "harmless. If it is a false warning of this stack, state it in envs/loaders.toml "
                                  f"[[selfcheck]] with its reason; otherwise {ctx.remedy_rebuild()}."), detail)] + gpu
    return [Result("import", name, PASSED, ok_text + (f"; {notes}" if notes else ""), detail=detail)] + gpu


def _pip_remedy(ctx: Context, r: dict) -> str:
    if r.get("pip"):
        return ""
    return ("This env has no pip: kt doctor and kt version run `python -m pip show sglang-kt` to tell the "
            "kvcache-ai fork from PyPI's sglang, and without pip they call it PyPI's. Rebuild the env from a lock "
            f"made with the rule pip-for-upstream-tools (envs/rules.toml): {ctx.target.build_hint()}")


def kt_cli(ctx: Context, r: dict | None, why: str) -> list[Result]:
    if r is None:
        return [Result("import", "kt doctor", FAILED, f"kt doctor (kt-kernel's CLI) {why}",
                       "Run `kt doctor -v` in the env by hand to see the whole error.")]
    if r.get("missing"):
        return [Result("import", "kt doctor", SKIPPED, f"this kt-kernel has no CLI to run: {r['missing']}")]
    doc = r["doctor"]
    rows = doc["rows"]
    if not rows:
        return [Result("import", "kt doctor", FAILED, f"kt doctor -v printed no table ktenv could read (exit {doc['exit']}): "
                       f"{' '.join(doc['text'].split())[-400:]}", "Run `kt doctor -v` in the env by hand.")]
    seen = [(row["check"], row["value"]) for row in rows if row["status"] != "ok"]
    ok = sum(1 for row in rows if row["status"] == "ok")
    out = _judge(ctx, "kt doctor -v", "kt doctor", seen, f"{ok} of {len(rows)} rows OK", _pip_remedy(ctx, r))
    out[0].detail["rows"] = rows
    # kt version: each package at its locked version, sglang-kt recognised as the fork (not "(PyPI)").
    seen, have = [], []
    for p in r["version"]["packages"]:
        locked = ctx.lock.version_of(p["check"])
        have.append(f"{p['check']} {p['value']}")
        if (locked and p["value"].split(" ")[0] != locked) or "(PyPI)" in p["value"]:
            seen.append((p["check"], p["value"]))
    if not have:
        seen.append(("packages", "none listed"))
    out += _judge(ctx, "kt version", "kt version", seen, ", ".join(have), _pip_remedy(ctx, r))
    return out


def check_env(ctx: Context, r: dict | None, why: str) -> list[Result]:
    name = "sglang check_env"
    if r is None:
        return [Result("import", name, FAILED, f"`python -m sglang.check_env` {why}", "Run it in the env by hand.")]
    seen = [("crash", r["crashed"])] if r["crashed"] else []
    locked = {canonicalize_name(e.name) for e in ctx.lock.entries()}
    absent = []
    for key, value in r["items"].items():
        if value == "Module Not Found":
            if _note(ctx, "sglang.check_env", key, value) is None and canonicalize_name(key) not in locked:
                absent.append(key)  # an optional package this stack does not install
            else:
                seen.append((key, value))
    ok = (f"{len(r['items'])} items printed" + (f"; not part of this stack: {', '.join(absent)}" if absent else "")
          if not r["crashed"] else "")
    res = _judge(ctx, name, "sglang.check_env", seen, ok)
    if r["crashed"] and res[0].status == PASSED:  # it did not get to print: nothing passed but the judgement
        return res[1:]
    return res


def upstream_names(ctx: Context, r: dict | None, why: str) -> list[Result]:
    name = "upstream names"
    if r is None:
        return [Result("import", name, FAILED, f"reading sglang.__version__ and accelerate's view {why}", "")]
    items = r["items"]
    want = {"sglang.__version__": ctx.lock.version_of("sglang-kt") or "", "accelerate is_transformers_available()": "True"}
    seen = [(k, str(v)) for k, v in items.items() if str(v) != want.get(k)]
    return _judge(ctx, name, "upstream", seen, ", ".join(f"{k} = {v}" for k, v in items.items()))


def selfcheck_results(ctx: Context) -> list[Result]:
    """Run the three probes (side by side: through the fork server they are forked children) and judge them.

    kt doctor spends most of its ~15 s of CPU in a new interpreter it starts itself
    (`python -m sglang.launch_server --help`): it gains little from the warm parent and
    would be the smoke's last job if it waited for the preload, so it starts at once."""
    jobs = (("kt_cli", kt_cli, False), ("sglang_check_env", check_env, True), ("upstream_names", upstream_names, True))
    with ThreadPoolExecutor(len(jobs)) as pool:
        runs = [(judge, pool.submit(probe, ctx, "selfcheck.py", [arg], warm=warm)) for arg, judge, warm in jobs]
        return [res for judge, fut in runs for res in judge(ctx, *fut.result())]
