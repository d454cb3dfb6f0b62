"""Run kt-kernel's DeepSeek-V4 AMXINT4 conversion script, and check its output. Runs INSIDE the env.

    <env>/bin/python convert_probe.py run SCRIPT -- <the script's arguments>
    <env>/bin/python convert_probe.py check MODEL OUT --layer L --threadpool P [--corrupt swap]

run: executes SCRIPT (kt-kernel/scripts/convert_cpu_weights_ds4.py from a
ktransformers checkout) as __main__, with one workaround and nothing else:
kt-kernel allocates its host buffers with `pin_memory=True`
(experts_base.py), which torch refuses without an NVIDIA driver ("Found no
NVIDIA driver"). Pinning only speeds up host->GPU copies; the conversion
copies nothing to a GPU. So when torch sees no CUDA device, the probe makes
torch's tensor factories ignore pin_memory and counts how often it did; the
report says so. With a GPU nothing is changed. The script's own output (its
progress) passes through.

check: one converted layer, numerically. The layer's MXFP4 experts are read
from MODEL with kt-kernel's MXFP4SafeTensorLoader and dequantized; the INT4
weights kt-kernel's AMXINT4 quantizer should have produced are emulated in
torch (per output row, per threadpool slot: scale = max|w| / 112, values
rounded to int8 then to a multiple of 16, i.e. 4 bits); the converted files
are loaded into kt-kernel's AMXInt4_MOE with P subpools (the whole layer);
a forward at 1 and 32 tokens, routed among the layer's first 8 experts (only
those are dequantized: memory stays small at V4-Flash's size), is compared with a float32 torch MoE over the emulated weights
(the check) and over the MXFP4 weights (what the conversion costs in
accuracy, reported). `--corrupt swap` loads the next layer's files instead,
to show the check failing.

Prints `KTENV-RESULT {json}` last on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
import traceback

MARK = "KTENV-RESULT "
GROUP = 32
ROUTED = 8  # experts the check routes tokens to
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _report(r: dict) -> None:
    sys.stdout.flush()
    sys.stdout.write("\n" + MARK + json.dumps(r) + "\n")
    sys.stdout.flush()


def unpin_without_driver(torch) -> dict:
    """Make pin_memory a no-op when torch has no CUDA device; returns the counter."""
    state = {"active": not torch.cuda.is_available(), "pinned_requests_dropped": 0}
    if not state["active"]:
        return state

    def wrap(fn):
        def call(*a, **kw):
            if kw.get("pin_memory"):
                kw["pin_memory"] = False
                state["pinned_requests_dropped"] += 1
            return fn(*a, **kw)
        return call

    for name in ("empty", "zeros", "ones", "full", "tensor", "empty_strided", "zeros_like", "empty_like"):
        setattr(torch, name, wrap(getattr(torch, name)))

    def pin(self, *a, **kw):
        state["pinned_requests_dropped"] += 1
        return self
    torch.Tensor.pin_memory = pin
    return state


def run(script: str, script_args: list[str]) -> int:
    t0 = time.perf_counter()
    report = {"ok": False, "script": script, "args": script_args}
    try:
        import torch

        state = unpin_without_driver(torch)
        report["workaround"] = state
        if state["active"]:
            print("ktenv: no CUDA device: torch's pin_memory=True is ignored in this run (kt-kernel pins host "
                  "buffers for GPU copies; the conversion makes none)", flush=True)
        sys.argv = [script, *script_args]
        code = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:  # the script ends with exit(main())
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        report.update(ok=code == 0, exit_code=code)
    except Exception as e:  # reported; the caller decides
        report.update(error=f"{type(e).__name__}: {e}"[:1500], traceback_tail=traceback.format_exc()[-1500:])
    report["seconds"] = round(time.perf_counter() - t0, 2)
    _report(report)
    return 0


# --- check -------------------------------------------------------------------------

def dequant_mxfp4(packed, scale, torch):
    """[N, K/2] bytes (two E2M1 codes, low nibble first) + [N, K/32] scales -> float32 [N, K].

    The loader hands the UE8M0 scales over already widened to bf16 (lossless).
    """
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1).long()
    vals = torch.tensor(E2M1)[codes]
    return vals * scale.float().repeat_interleave(GROUP, dim=-1)


def emulate_int4(w, torch):
    """What kt-kernel's AMXINT4 quantizer keeps of w [N, K]: per row, d = max|w|/112,
    q8 = round(w/d), q4 = sign(q8) * ((|q8| + 8) // 16) in [-7, 7]; value = 16 * q4 * d."""
    d = w.abs().amax(-1, keepdim=True) / 112.0
    q8 = torch.round(w / torch.where(d > 0, d, torch.ones_like(d))).clamp(-127, 127)
    q4 = torch.sign(q8) * torch.div(q8.abs() + 8, 16, rounding_mode="floor")
    return q4 * 16 * d


def emulate_layer(gate, up, down, pools, torch):
    """Each threadpool slot holds 1/pools of the intermediate size: gate/up rows, down columns."""
    inter = gate.shape[1]
    s = inter // pools
    g = torch.stack([emulate_int4(x, torch) for x in gate])
    u = torch.stack([emulate_int4(x, torch) for x in up])
    d = torch.stack([torch.cat([emulate_int4(x[:, p * s:(p + 1) * s], torch) for p in range(pools)], dim=1)
                     for x in down])
    return g, u, d


def torch_moe(x, ids, weights, gate, up, down, torch):
    out = torch.zeros(x.shape[0], down.shape[1])
    xf = x.float()
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(gate[e] @ xf[t]) * (up[e] @ xf[t])
            out[t] += weights[t, j] * (down[e] @ h)
    return out


def check(model: str, out: str, layer: int, pools: int, threads: int, topk: int, corrupt: str) -> int:
    t0 = time.perf_counter()
    report = {"ok": False, "layer": layer, "threadpool": pools, "corrupt": corrupt}
    # kt-kernel's C++ side prints to fd 1; the report goes to the real stdout.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        import torch
        unpin_without_driver(torch)
        import kt_kernel
        from kt_kernel import kt_kernel_ext as ext
        from kt_kernel.utils.loader import MXFP4SafeTensorLoader

        report["variant"] = str(kt_kernel.__cpu_variant__)
        w = MXFP4SafeTensorLoader(model).load_experts(f"model.layers.{layer}")
        experts = len(w["gate"])
        # Tokens are routed among the first few experts only, so only those are
        # dequantized (a full V4-Flash layer in float32 would take ~26 GB).
        used = min(experts, ROUTED)
        topk = min(topk, used)
        gate = torch.stack([dequant_mxfp4(w["gate"][e], w["gate_scale"][e], torch) for e in range(used)])
        up = torch.stack([dequant_mxfp4(w["up"][e], w["up_scale"][e], torch) for e in range(used)])
        down = torch.stack([dequant_mxfp4(w["down"][e], w["down_scale"][e], torch) for e in range(used)])
        del w
        inter, hidden = gate.shape[1], gate.shape[2]
        eg, eu, ed = emulate_layer(gate, up, down, pools, torch)
        report["shape"] = {"experts": experts, "routed_among": used, "hidden": hidden, "intermediate": inter,
                           "topk": topk}

        wc = ext.WorkerPoolConfig()
        wc.subpool_count = pools
        wc.subpool_numa_map = [0] * pools  # a check needs no NUMA placement; node 0 exists everywhere
        wc.subpool_thread_count = [max(1, threads // pools)] * pools
        cpu = ext.CPUInfer(wc)
        mask = torch.zeros(experts, dtype=torch.bool)
        cfg = ext.moe.MOEConfig(experts, topk, hidden, inter, mask.data_ptr())
        cfg.layer_idx = layer + (1 if corrupt == "swap" else 0)
        cfg.pool = cpu.backend_
        cfg.max_len = 32
        cfg.path = out
        cfg.load = True
        cfg.save = False
        moe = ext.moe.AMXInt4_MOE(cfg)
        p2l = torch.arange(experts, dtype=torch.int64)
        cpu.submit(moe.load_weights_task(p2l.data_ptr()))
        cpu.sync()
        cases = []
        for i, qlen in enumerate((1, 32)):
            g = torch.Generator().manual_seed(100 + i)
            ids = torch.stack([torch.randperm(used, generator=g)[:topk] for _ in range(qlen)]).to(torch.int64)
            wts = torch.rand(qlen, topk, generator=g).contiguous()
            x = (torch.randn(qlen, hidden, generator=g) / 10).to(torch.bfloat16).contiguous()
            got = torch.empty(qlen, hidden, dtype=torch.bfloat16)
            n = torch.tensor([qlen], dtype=torch.int32)
            cpu.submit(moe.forward_task(n.data_ptr(), topk, ids.contiguous().data_ptr(), wts.data_ptr(),
                                        x.data_ptr(), got.data_ptr(), False))
            cpu.sync()
            got = got.float()
            ref_int4 = torch_moe(x, ids, wts, eg, eu, ed, torch)
            ref_mxfp4 = torch_moe(x, ids, wts, gate, up, down, torch)
            rel = lambda a, b: float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))  # noqa: E731
            cases.append({"qlen": qlen, "rel_l1_vs_int4_emulation": round(rel(got, ref_int4), 5),
                          "rel_l1_vs_mxfp4": round(rel(got, ref_mxfp4), 5),
                          "finite": bool(torch.isfinite(got).all())})
        report.update(ok=True, cases=cases)
    except Exception as e:  # reported; the caller decides
        report.update(error=f"{type(e).__name__}: {e}"[:1500], traceback_tail=traceback.format_exc()[-1500:])
    report["seconds"] = round(time.perf_counter() - t0, 2)
    sys.stdout.flush()
    os.write(saved, ("\n" + MARK + json.dumps(report) + "\n").encode())
    os.close(saved)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        rest = argv[1:]
        if len(rest) < 1:
            print("usage: convert_probe.py run SCRIPT -- ARGS...", file=sys.stderr)
            return 2
        script, tail = rest[0], rest[1:]
        return run(script, tail[1:] if tail[:1] == ["--"] else tail)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("check",))
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--threadpool", type=int, default=1)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--corrupt", choices=("none", "swap"), default="none")
    a = ap.parse_args(argv)
    return check(a.model, a.out, a.layer, a.threadpool, a.threads, a.topk, a.corrupt)


if __name__ == "__main__":
    sys.exit(main())
