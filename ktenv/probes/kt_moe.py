"""A real KT-Kernel MXFP4 MoE forward, checked against torch. Runs INSIDE the env.

    <env>/bin/python kt_moe.py [--experts 8 --hidden 256 --intermediate 512 --topk 2]
    <env>/bin/python kt_moe.py --bench --experts 16 --hidden 4096 --intermediate 2048 --topk 4

Check mode (default): random bf16 expert weights are quantized to MXFP4 (E2M1
values, one bf16 scale per 32 inputs), loaded into the kernel, and a forward at
1 token (the mat-vec path) and at 32 tokens (the mat-mat path) is compared with
a float32 torch MoE over the same dequantized weights. Bench mode times the
forward instead and reports tokens/s.

stdout is ONE JSON object (kt-kernel's C++ chatter is moved to stderr):
  {"probe": "kt_moe", "mode", "variant", "backend", "shape": {...}, "threads",
   "tolerance": {"rel_l1": ..}, "cases": [{"qlen", "rel_l1", "max_abs_err",
   "max_rel_err", "passed"}], "passed", "seconds", ...}
Exit status: 0 passed, 1 a case failed the tolerance, 2 it could not run.
The variant is whatever kt-kernel loads (set KT_KERNEL_CPU_VARIANT to force one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

GROUP = 32  # MXFP4 block: one scale per 32 consecutive inputs
# The 16 E2M1 code points in nibble order (bit 3 is the sign).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
# Relative L1 (mean |kernel - ref| / mean |ref|). The kernel rounds activations
# and the gate/up product to bf16 where the reference keeps float32; upstream's
# own checks at these shapes land near 0.005, so 0.03 leaves room for bf16
# rounding while a wrong layout, scale or routing gives errors near 1.
DEFAULT_TOL = 0.03


def quantize_mxfp4(w, torch):
    """[E, N, K] float -> (packed int32 [E, N, K/8], bf16 scales [E, N, K/32], dequantized float32).

    Nibble i of a row is input k=i; two per byte, the even k in the low half,
    little-endian bytes into int32 words (the layout the kernel unpacks).
    """
    e, n, k = w.shape
    blocks = w.float().reshape(e, n, k // GROUP, GROUP)
    scale = (blocks.abs().amax(-1) / 6.0).clamp_min(1e-8).to(torch.bfloat16)
    s = scale.float().unsqueeze(-1)
    mags = torch.tensor(E2M1[:8])
    # Nearest code point by magnitude: midpoints between neighbours as cut points.
    cuts = (mags[1:] + mags[:-1]) / 2
    mag_idx = torch.bucketize((blocks / s).abs(), cuts)
    code = mag_idx + 8 * (blocks < 0).to(mag_idx.dtype)
    deq = (mags[mag_idx] * torch.where(blocks < 0, -1.0, 1.0) * s).reshape(e, n, k)
    nib = code.reshape(e, n, k // 2, 2).to(torch.uint8)
    packed = (nib[..., 0] | (nib[..., 1] << 4)).contiguous().view(torch.int32)
    return packed.contiguous(), scale.contiguous(), deq


def torch_moe(x, ids, weights, gate, up, down, torch):
    """float32 reference: sum_k w_k * down_e(silu(gate_e x) * up_e x)."""
    xf = x.float()
    out = torch.zeros(x.shape[0], down.shape[1])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(gate[e] @ xf[t]) * (up[e] @ xf[t])
            out[t] += weights[t, j] * (down[e] @ h)
    return out


class Moe:
    def __init__(self, ext, torch, experts, hidden, inter, topk, threads, backend, max_len, seed=0, corrupt="none",
                 random_codes=False):
        self.torch, self.ext, self.topk = torch, ext, topk
        names = {"amx": "AMXFP4_KGroup_MOE", "avx2": "AVX2MXFP4_MOE"}
        if backend == "auto":
            backend = "amx" if hasattr(ext.moe, names["amx"]) else "avx2"
        cls = getattr(ext.moe, names[backend], None)
        if cls is None:
            raise RuntimeError(f"this kt-kernel build has no {names[backend]}")
        self.backend = names[backend]
        g = torch.Generator().manual_seed(seed)
        shapes = {"gate": (experts, inter, hidden), "up": (experts, inter, hidden), "down": (experts, hidden, inter)}
        if random_codes:
            # Bench: any nibbles and scales time the same; skips quantizing GBs of floats.
            self.q = {n: (torch.randint(0, 256, (e, r, c // 2), dtype=torch.uint8, generator=g).view(torch.int32),
                          (torch.rand(e, r, c // GROUP, generator=g) / 100 + 1e-3).to(torch.bfloat16), None)
                      for n, (e, r, c) in shapes.items()}
        else:
            self.q = {n: quantize_mxfp4(torch.randn(*shape, generator=g) / 50, torch) for n, shape in shapes.items()}
        # What the kernel is handed; `corrupt` breaks it on purpose so a test can
        # show the check failing (the reference keeps the right weights).
        self.kq = dict(self.q)
        if corrupt == "scales":
            self.kq = {n: (p, (s.float() * 2).to(torch.bfloat16).contiguous(), d) for n, (p, s, d) in self.q.items()}
        elif corrupt == "nibbles":
            swap = lambda p: (((p.view(torch.uint8) >> 4) | (p.view(torch.uint8) << 4)).contiguous().view(torch.int32))
            self.kq = {n: (swap(p).contiguous(), s, d) for n, (p, s, d) in self.q.items()}
        self.cpuinfer = ext.CPUInfer(threads)
        cfg = ext.moe.MOEConfig(experts, topk, hidden, inter, 0)
        cfg.max_len = max_len
        cfg.quant_config.bits = 4
        cfg.quant_config.group_size = GROUP
        cfg.quant_config.zero_point = False
        cfg.gate_proj, cfg.gate_scale = self.kq["gate"][0].data_ptr(), self.kq["gate"][1].data_ptr()
        cfg.up_proj, cfg.up_scale = self.kq["up"][0].data_ptr(), self.kq["up"][1].data_ptr()
        cfg.down_proj, cfg.down_scale = self.kq["down"][0].data_ptr(), self.kq["down"][1].data_ptr()
        cfg.pool = self.cpuinfer.backend_
        self.moe = cls(cfg)
        self.p2l = torch.arange(experts, dtype=torch.int64)
        self.cpuinfer.submit(self.moe.load_weights_task(self.p2l.data_ptr()))
        self.cpuinfer.sync()
        self.experts, self.hidden = experts, hidden

    def inputs(self, qlen, seed):
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(self.experts, generator=g)[: self.topk] for _ in range(qlen)]).to(torch.int64)
        weights = torch.rand(qlen, self.topk, generator=g).contiguous()
        x = (torch.randn(qlen, self.hidden, generator=g) / 10).to(torch.bfloat16).contiguous()
        return ids.contiguous(), weights, x

    def forward(self, ids, weights, x):
        torch = self.torch
        out = torch.empty(x.shape[0], self.hidden, dtype=torch.bfloat16)
        qlen = torch.tensor([x.shape[0]], dtype=torch.int32)  # the kernel reads an int*
        self.cpuinfer.submit(self.moe.forward_task(qlen.data_ptr(), self.topk, ids.data_ptr(), weights.data_ptr(),
                                                   x.data_ptr(), out.data_ptr(), False))
        self.cpuinfer.sync()
        return out


def check(moe, torch, qlens, tol):
    deq = {n: moe.q[n][2] for n in ("gate", "up", "down")}
    cases = []
    for i, qlen in enumerate(qlens):
        ids, w, x = moe.inputs(qlen, 100 + i)
        got = moe.forward(ids, w, x).float()
        ref = torch_moe(x, ids, w, deq["gate"], deq["up"], deq["down"], torch)
        err = (got - ref).abs()
        rel_l1 = float(err.mean() / ref.abs().mean().clamp_min(1e-12))
        cases.append({
            "qlen": qlen,
            "rel_l1": round(rel_l1, 6),
            "max_abs_err": round(float(err.max()), 6),
            "max_rel_err": round(float(err.max() / ref.abs().max().clamp_min(1e-12)), 6),
            "finite": bool(torch.isfinite(got).all()),
            "passed": bool(torch.isfinite(got).all()) and rel_l1 <= tol,
        })
    return cases


def bench(moe, qlens, warmup, seconds):
    results = []
    for qlen in qlens:
        ids, w, x = moe.inputs(qlen, 7)
        for _ in range(warmup):
            moe.forward(ids, w, x)
        n, t0 = 0, time.perf_counter()
        while True:
            moe.forward(ids, w, x)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds and n >= 3:
                break
        results.append({"qlen": qlen, "iters": n, "ms_per_forward": round(1000 * dt / n, 4),
                        "tokens_per_s": round(qlen * n / dt, 2)})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--qlen", type=int, action="append", help="token counts (default: 1 and 32)")
    # One core is left to the submitting thread, which spins in CPUInfer.sync():
    # 2 workers on a 2-core machine ran decode 3x slower than 1 worker here.
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    ap.add_argument("--backend", choices=("auto", "amx", "avx2"), default="auto",
                    help="amx = AMXFP4_KGroup_MOE (absent from the avx2 build), avx2 = AVX2MXFP4_MOE")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOL, help="max relative L1 error")
    ap.add_argument("--corrupt", choices=("none", "scales", "nibbles"), default="none",
                    help="hand the kernel wrong weights on purpose (to see the check fail)")
    ap.add_argument("--bench", action="store_true", help="time the forward instead of checking it")
    ap.add_argument("--bench-seconds", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    qlens = args.qlen or [1, 32]
    t0 = time.perf_counter()
    report = {"probe": "kt_moe", "mode": "bench" if args.bench else "check",
              "shape": {"experts": args.experts, "hidden": args.hidden, "intermediate": args.intermediate,
                        "topk": args.topk, "group_size": GROUP},
              "threads": args.threads, "override": os.environ.get("KT_KERNEL_CPU_VARIANT"),
              "corrupt": args.corrupt}
    if not args.bench:
        report["tolerance"] = {"rel_l1": args.tolerance}
    # kt-kernel's C++ side prints to fd 1; keep the real stdout for the JSON alone.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    code = 2
    try:
        import torch
        torch.set_num_threads(args.threads)
        import kt_kernel
        from kt_kernel import kt_kernel_ext as ext
        report.update(variant=str(kt_kernel.__cpu_variant__), kt_kernel_version=getattr(kt_kernel, "__version__", None),
                      torch_version=torch.__version__)
        with torch.inference_mode():
            moe = Moe(ext, torch, args.experts, args.hidden, args.intermediate, args.topk, args.threads,
                      args.backend, max(qlens), corrupt=args.corrupt, random_codes=args.bench)
            report["backend"] = moe.backend
            if args.bench:
                report["results"] = bench(moe, qlens, args.warmup, args.bench_seconds)
                report["passed"] = True
                code = 0
            else:
                report["cases"] = check(moe, torch, qlens, args.tolerance)
                report["passed"] = all(c["passed"] for c in report["cases"])
                code = 0 if report["passed"] else 1
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        report.update(passed=False, error=f"{type(e).__name__}: {e}")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    sys.stdout.flush()
    # fd 1 stays on stderr to the end: CPUInfer says goodbye at interpreter exit.
    os.write(saved, ("KTENV-RESULT " + json.dumps(report) + "\n").encode())
    os.close(saved)
    return code


if __name__ == "__main__":
    sys.exit(main())
