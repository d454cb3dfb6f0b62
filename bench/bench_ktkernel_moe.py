"""KT-Kernel MXFP4 MoE throughput per CPU variant: is the env's choice the fastest here?

    python bench/bench_ktkernel_moe.py --python .envs/sm90/bin/python

For every kt-kernel variant this CPU can run, a fresh process of the env's
python runs ktenv/probes/kt_moe.py --bench with KT_KERNEL_CPU_VARIANT forcing
that variant (random MXFP4 weights; 1 token = decode, 32 tokens = prefill).
Rounds are interleaved and the best round per configuration is kept, since a
2-core VM is noisy. The headline (last line) is the env's own choice's decode
throughput over the fastest decode seen: 1.00 means the env picked the fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktenv import hostinfo, ktkernel  # noqa: E402

MOE = Path(ktkernel.__file__).parent / "probes" / "kt_moe.py"


def run_one(python: str, variant: str | None, backend: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KT_KERNEL_CPU_VARIANT"}
    if variant:
        env["KT_KERNEL_CPU_VARIANT"] = variant
    cmd = [python, str(MOE), "--bench", "--backend", backend, "--experts", str(args.experts),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--topk", str(args.topk),
           "--bench-seconds", str(args.seconds)]
    for q in args.qlen:
        cmd += ["--qlen", str(q)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"passed": False, "error": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="the env's python (has torch and kt_kernel)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--qlen", type=int, action="append", help="token counts (default 1 and 32)")
    ap.add_argument("--threads", type=int, help="CPUInfer workers (default: kt_moe.py's, cores - 1)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per token count")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--avx2-backend-too", action="store_true",
                    help="also time AVX2MXFP4_MOE inside the AVX512/AMX variants")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # absolute, not resolved: a venv's python must keep its venv path
    args.python = os.path.abspath(args.python)
    args.qlen = args.qlen or [1, 32]

    cpu = hostinfo.cpu_info()
    variants = ktkernel.runnable_variants(cpu.flags)
    probe = ktkernel.run_probe(args.python, {k: v for k, v in os.environ.items() if k != "KT_KERNEL_CPU_VARIANT"})
    if not probe.get("ok"):
        print(f"kt_kernel does not import with {args.python}: {probe.get('error')}", file=sys.stderr)
        return 2
    chosen = probe["variant"]
    configs = [(v, "auto") for v in variants]
    if args.avx2_backend_too:
        configs += [(v, "avx2") for v in variants if v != "avx2"]
    print(f"CPU: {cpu.model} ({cpu.logical_cpus} logical), {hostinfo.isa_summary(cpu.flags)}")
    print(f"kt-kernel {probe.get('kt_kernel_version')} in {args.python}; env's choice: {chosen}; "
          f"runnable here: {', '.join(variants)}")
    print(f"shape: {args.experts} experts, top-{args.topk}, hidden {args.hidden}, intermediate {args.intermediate}; "
          f"{args.rounds} interleaved rounds, best kept", flush=True)

    best: dict[tuple, dict] = {}
    for r in range(args.rounds):
        for variant, backend in (configs if r % 2 == 0 else configs[::-1]):
            rep = run_one(args.python, variant, backend, args)
            if not rep.get("passed"):
                print(f"  {variant}/{backend}: failed: {rep.get('error')}", flush=True)
                continue
            for res in rep["results"]:
                key = (variant, rep["backend"], res["qlen"])
                if key not in best or res["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = {**res, "threads": rep["threads"]}
            print(f"  round {r + 1}: {variant:12s} {rep['backend']:18s} "
                  + "  ".join(f"qlen {x['qlen']}: {x['tokens_per_s']:8.2f} tok/s" for x in rep["results"]), flush=True)

    print()
    print(f"{'variant':12s} {'backend':18s} " + " ".join(f"{'qlen ' + str(q):>14s}" for q in args.qlen) + "   (tok/s, best round)")
    rows = sorted({(v, b) for v, b, _ in best}, key=lambda vb: (ktkernel.VARIANTS.index(vb[0]), vb[1]))
    for v, b in rows:
        mark = "  <- env's choice" if v == chosen and b == _auto_backend(probe, v) else ""
        print(f"{v:12s} {b:18s} " + " ".join(f"{best[(v, b, q)]['tokens_per_s']:14.2f}" if (v, b, q) in best
                                               else f"{'-':>14s}" for q in args.qlen) + mark)
    decode = args.qlen[0]
    auto = {v: _auto_backend(probe, v) for v in variants}
    served = {v: best.get((v, auto[v], decode)) for v in variants}
    served = {v: x["tokens_per_s"] for v, x in served.items() if x}
    if chosen not in served or not served:
        print("the env's choice did not run; no headline")
        return 1
    fastest = max(served, key=served.get)
    ratio = served[chosen] / served[fastest]
    print(f"\ndecode (qlen {decode}): env's choice {chosen} {served[chosen]:.2f} tok/s; fastest {fastest} "
          f"{served[fastest]:.2f} tok/s -> {'the env picks the fastest' if fastest == chosen else 'NOT the fastest'}"
          + (" (within noise)" if fastest != chosen and ratio > 0.95 else ""))
    if args.json:
        print(json.dumps({"chosen": chosen, "fastest": fastest, "ratio": round(ratio, 3),
                          "results": [{"variant": v, "backend": b, "qlen": q, **x} for (v, b, q), x in best.items()]}))
    print(f"kt_moe_env_choice_over_fastest_decode: {ratio:.2f}")
    return 0


def _auto_backend(probe: dict, variant: str) -> str:
    # What kt-kernel's own MXFP4 selection (and kt_moe.py's `auto`) uses: the
    # AMX-named class wherever the build has it, i.e. every variant but avx2.
    return "AVX2MXFP4_MOE" if variant == "avx2" else "AMXFP4_KGroup_MOE"


if __name__ == "__main__":
    sys.exit(main())
