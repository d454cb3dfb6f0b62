"""Which kt-kernel variant (and method) a measured table says to run, and what to tell the user.

Pure functions over the table `tune` measures, so recorded tables from other
machines can be decided again and tested. A row is one (variant, method)
with one sample per interleaved round and phase, in tokens/s:

    {"variant": "avx512_base", "method": "MXFP4",
     "samples": {"decode": [98.1, 91.0, ...], "prefill": [402.0, None, ...]}}

Samples of one round were taken minutes apart at most and in a rotated
order, so comparing two rows round by round (paired ratios) cancels most of
a shared machine's drifting load; a sample that failed is None.

Public API:
  PHASES, WORKLOADS
  stats(values) -> dict                          median, quartiles, spread
  clearly_faster(a, b, phase, margin) -> bool    a beats b beyond the noise
  decide(rows, workload, margin, default) -> dict  the pick for each method
  advice(result, workload) -> list[str]          sentences for launch
"""

from __future__ import annotations

import math

PHASES = ("decode", "prefill")
WORKLOADS = ("decode", "prefill", "mixed")
# The order phases are looked at, per workload: the first decides, the next
# breaks ties in the first. "mixed" is the per-round geometric mean of both
# phases (scale-free, so neither phase's larger numbers dominate).
PHASE_ORDER = {"decode": ("decode", "prefill"), "prefill": ("prefill", "decode"), "mixed": ("mixed", "prefill")}
# What a tie that survives every phase is settled by, after kt-kernel's own
# pick: the phase the workload cares about. For "mixed" that is prefill:
# decode is memory-bound and its variants sit within noise of each other,
# prefill is where they differ (up to 2x).
CARES = {"decode": "decode", "prefill": "prefill", "mixed": "prefill"}
# Fewer paired rounds than this separate nothing: 3 of 3 rounds in one
# direction happens by chance to one pair in eight, so everything ties (and
# kt-kernel's own pick stays).
MIN_ROUNDS = 4


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def stats(values: list[float | None]) -> dict | None:
    """median, q25, q75, min, max, n and spread = (q75 - q25) / median; None without a value."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    med = _quantile(vals, 0.5)
    q25, q75 = _quantile(vals, 0.25), _quantile(vals, 0.75)
    return {"median": round(med, 2), "q25": round(q25, 2), "q75": round(q75, 2), "min": round(vals[0], 2),
            "max": round(vals[-1], 2), "n": len(vals), "spread": round((q75 - q25) / med, 4) if med else None}


def series(row: dict, phase: str) -> list[float | None]:
    """The row's per-round values for a phase; "mixed" is sqrt(decode * prefill) per round."""
    s = row.get("samples", {})
    if phase != "mixed":
        return list(s.get(phase, []))
    return [math.sqrt(d * p) if d and p else None for d, p in zip(s.get("decode", []), s.get("prefill", []))]


def median(row: dict, phase: str) -> float | None:
    st = stats(series(row, phase))
    return st["median"] if st else None


def paired_ratios(a: dict, b: dict, phase: str) -> list[float]:
    """a / b for each round where both have a value."""
    return [x / y for x, y in zip(series(a, phase), series(b, phase)) if x and y]


def clearly_faster(a: dict, b: dict, phase: str, margin: float) -> bool:
    """True when a beat b by more than `margin` in at least three rounds of four (and >= MIN_ROUNDS rounds).

    That is the lower quartile of the paired per-round ratios: one lucky
    round cannot make a winner, and a difference smaller than the margin is
    a tie however consistent it is (it would not be worth an override).
    """
    r = sorted(paired_ratios(a, b, phase))
    return len(r) >= MIN_ROUNDS and _quantile(r, 0.25) > 1 + margin


def _key(row: dict) -> str:
    return f"{row['variant']}/{row['method']}"


def pick(rows: list[dict], workload: str, margin: float, default: str | None) -> dict:
    """The winner among rows (one method's rows) for a workload, with why.

    For each phase in PHASE_ORDER[workload]: keep the rows that the phase's
    best (by median) does not clearly beat. What survives every phase is a
    tie; the tie goes to kt-kernel's own pick (`default`, so no override is
    needed) if it survived, else to the best median of the phase the
    workload cares about (CARES).
    """
    live = [r for r in rows if median(r, "decode") and median(r, "prefill")]
    if not live:
        return {"winner": None, "why": "no configuration produced both a decode and a prefill sample"}
    steps, tied_in = [], []
    for phase in PHASE_ORDER[workload]:
        best = max(live, key=lambda r: median(r, phase))
        kept = [r for r in live if r is best or not clearly_faster(best, r, phase, margin)]
        steps.append({"phase": phase, "best": _key(best), "tied": [_key(r) for r in kept if r is not best],
                      "dropped": [_key(r) for r in live if r not in kept]})
        if len(kept) == 1:
            live = kept
            break
        tied_in.append(phase)
        live = kept
    others = lambda w: ", ".join(_key(r) for r in live if r is not w) or "none"  # noqa: E731
    if len(live) == 1:
        winner = live[0]
        decided = steps[-1]["phase"]
        how = f"fastest in {decided} beyond the noise"
        if tied_in:
            rivals = [k for k in steps[0]["tied"] + [steps[0]["best"]] if k != _key(winner)]
            how += f" (tied in {' and '.join(tied_in)} with {', '.join(rivals)})"
    elif any(r["variant"] == default for r in live):
        winner = next(r for r in live if r["variant"] == default)
        how = f"tied in {' and '.join(tied_in)} with {others(winner)}; kt-kernel's own pick"
    else:
        winner = max(live, key=lambda r: median(r, CARES[workload]))
        how = f"tied in {' and '.join(tied_in)} with {others(winner)}; best {CARES[workload]} median"
    return {"winner": _key(winner), "variant": winner["variant"], "method": winner["method"], "why": how,
            "steps": steps, "tie": len(live) > 1}


def decide(rows: list[dict], workload: str, margin: float, default: str | None) -> dict:
    """{method: pick(...)} for every method in the table, for one workload."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not {workload!r}")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return {m: pick([r for r in rows if r["method"] == m], workload, margin, default) for m in methods}


def _row(result: dict, key: str | None) -> dict | None:
    return next((r for r in result.get("rows", []) if key and _key(r) == key), None)


def method_gain(result: dict, workload: str) -> dict | None:
    """AMXINT4's best against MXFP4's best in the workload's first phase, or None if not both measured."""
    dec = result.get("decisions", {}).get(workload, {})
    a, m = _row(result, dec.get("AMXINT4", {}).get("winner")), _row(result, dec.get("MXFP4", {}).get("winner"))
    if not a or not m:
        return None
    phase = PHASE_ORDER[workload][0]
    ratio = median(a, phase) / median(m, phase)
    margin = result["settings"]["tie_margin"]
    return {"phase": phase, "ratio": round(ratio, 3), "amxint4": _key(a), "mxfp4": _key(m),
            "beyond_noise": clearly_faster(a, m, phase, margin),
            "per_phase": {p: round(median(a, p) / median(m, p), 3) for p in PHASES}}


def advice(result: dict, workload: str) -> list[str]:
    """Sentences for `launch` (and `tune`'s own output) about this host's measured choice.

    Says which variant launch exports and why when it is not kt-kernel's own
    pick; when AMXINT4 beats MXFP4 by the advice factor in the workload's
    phase, says so with what it costs and how to convert.
    """
    out: list[str] = []
    dec = result.get("decisions", {}).get(workload)
    if dec is None:
        return [f"No tuning for the {workload} workload in this result; rerun `build.py tune --workload {workload}`."]
    mx = dec.get("MXFP4", {})
    default = result.get("default_variant")
    if result.get("forced"):
        out.append(f"KT_KERNEL_CPU_VARIANT={result['forced']} was forced with --variant, not measured"
                   + (f" (kt-kernel's own pick here is {default})." if default and default != result["forced"] else "."))
    elif mx.get("variant") and mx["variant"] != default:
        row, base = _row(result, mx["winner"]), _row(result, f"{default}/MXFP4")
        gain = (" (" + ", ".join(f"{median(row, p) / median(base, p):.2f}x its {p}" for p in ("prefill", "decode")) + " here)"
                if row and base and all(median(base, p) for p in PHASES) else "")
        out.append(f"kt-kernel would load its {default} build by ISA rank; for a {workload} workload {mx['variant']} "
                   f"measured better{gain}: {mx['why']}. Launch exports KT_KERNEL_CPU_VARIANT={mx['variant']}.")
    g = method_gain(result, workload)
    cost = result.get("amxint4_costs", {})
    factor = result["settings"]["advice_factor"]
    if g is None:
        why = result.get("methods_skipped", {}).get("AMXINT4")
        if why:
            out.append(f"AMXINT4 was not measured: {why}")
        return out
    if g["beyond_noise"] and g["ratio"] >= factor:
        a_var = g["amxint4"].split("/")[0]
        decode_note = ("decode does not get faster (it is memory-bound: "
                       f"{g['per_phase']['decode']:.2f}x measured)" if g["per_phase"]["decode"] < factor
                       else f"decode {g['per_phase']['decode']:.2f}x")
        out.append(
            f"AMXINT4 would run this {workload} workload {g['ratio']:.2f}x faster than MXFP4 in {g['phase']} "
            f"({g['amxint4']} vs {g['mxfp4']}); {decode_note}. It costs accuracy: the experts are re-quantized "
            f"per row to INT4 (~{cost.get('rel_diff_vs_mxfp4', 0.29):.0%} relative output difference from the "
            "MXFP4 experts on random weights; the kernel itself is within "
            f"~{cost.get('rel_diff_vs_int4_emulation', 0.02):.0%} of an exact INT4 emulation, so the loss is the format's)"
            + (", and sglang-kt drops DeepSeek-V4's SwiGLU clamp for AMXINT4" if cost.get("swiglu_clamp_dropped", True) else "")
            + f". To try it: `python build.py convert --arch {result.get('arch') or 'ARCH'} --model MODEL --output DIR "
            "--kt-source CHECKOUT`, "
            f"then `launch --kt-weight-path DIR` (it picks --kt-method AMXINT4; serve with the same "
            f"--kt-threadpool-count it was converted with) and KT_KERNEL_CPU_VARIANT={a_var}.")
    else:
        out.append(f"AMXINT4 is not worth converting to for a {workload} workload here: {g['ratio']:.2f}x MXFP4 in "
                   f"{g['phase']} ({g['amxint4']} vs {g['mxfp4']}; the bar is {factor:.2f}x beyond the noise), "
                   "and it would cost accuracy.")
    return out
