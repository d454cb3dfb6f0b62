"""The kernel tier: a KT-Kernel MXFP4 MoE forward with the env's variant against
a float32 torch reference, on this CPU (probes/kt_moe.py)."""

from __future__ import annotations

from .result import FAILED, PASSED, Context, Result, probe


def kernel_tier(ctx: Context) -> list[Result]:
    name = "KT-Kernel MXFP4 MoE vs torch"
    rep, why = probe(ctx, "kt_moe.py", [], timeout=900)  # forked from the smoke's fork server when one runs
    if rep is None:
        return [Result("kernel", name, FAILED, f"the MoE probe {why}",
                       "SIGILL means the loaded kt-kernel build uses instructions this CPU lacks (#1713); "
                       "otherwise run ktenv/probes/kt_moe.py by hand in the env.")]
    shape = rep.get("shape", {})
    desc = (f"{rep.get('variant')} build, {rep.get('backend')}, {shape.get('experts')} experts, hidden {shape.get('hidden')}, "
            f"intermediate {shape.get('intermediate')}, top-{shape.get('topk')}")
    if "error" in rep:
        return [Result("kernel", name, FAILED, f"{desc}: {rep['error']}", "See the JSON report; run probes/kt_moe.py by hand.", rep)]
    cases = ", ".join(f"{c['qlen']} token(s): rel. L1 {c['rel_l1']:.4f}" for c in rep.get("cases", []))
    tol = rep.get("tolerance", {}).get("rel_l1")
    if not rep.get("passed"):
        return [Result("kernel", name, FAILED, f"{desc}: {cases} (tolerance {tol})",
                       "The CPU experts compute wrong results on this machine; do not serve with this kt-kernel build.", rep)]
    return [Result("kernel", name, PASSED, f"{desc}: {cases} (tolerance {tol}) in {rep.get('seconds')} s", detail=rep)]
