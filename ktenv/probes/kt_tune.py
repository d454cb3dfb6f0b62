"""A KT-Kernel MoE timing server for `build.py tune`. Runs INSIDE the env; never imports ktenv.

    KT_KERNEL_CPU_VARIANT=avx512_base <env>/bin/python kt_tune.py \
        --experts 16 --hidden 4096 --intermediate 2048 --topk 6 --threads 1 \
        --method MXFP4 --method AMXINT4 --max-len 128

One process holds one kt-kernel variant (the variable is read once, at
import), so `tune` starts one of these per variant and keeps them all alive:
it can then interleave short timing samples across variants without paying
the ~5-10 s torch import again for every sample.

At start it builds one MoE layer per method, with the classes sglang-kt's
wrappers use (kt_kernel.utils.amx: MXFP4 through kt-kernel's own backend
choice, AMXINT4 through AMXInt4_MOE), runs one forward of each as a sanity
check (finite, non-zero output), and prints ONE line

    KTENV-RESULT {"probe": "kt_tune", "ready": true, "variant": ..., "methods": {NAME: {"ok", "class",
                  "setup_seconds", "error"?}}, ...}

Then each command line on stdin gets one `KTENV-RESULT {json}` line back:

    {"cmd": "time", "method": "MXFP4", "qlen": 1, "min_seconds": 0.25, "min_iters": 3, "warmup": 1}
        -> {"method", "qlen", "iters", "ms": [wall milliseconds per forward]}
    {"cmd": "quit"}  -> exits 0

Weights are random: the MoE kernels' speed does not depend on the values.
MXFP4 gets random nibbles and scales; AMXINT4 gets one random bf16 expert
copied to every expert slot and quantized by the kernel's own online path
(what AMXMoEWrapper.load_weights_from_tensors does), so each expert is a
separate buffer and the working set is as large as asked.
kt-kernel's C++ side prints to fd 1; it is moved to stderr so stdout carries
only the KTENV-RESULT lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

GROUP = 32  # MXFP4: one scale per 32 inputs
MARK = "KTENV-RESULT "


class Layer:
    """One MoE layer of one method, ready to time."""

    def __init__(self, ext, torch, method, args):
        self.torch, self.ext, self.topk, self.hidden, self.experts = torch, ext, args.topk, args.hidden, args.experts
        self.cpuinfer = ext.CPUInfer(args.threads)
        e, h, i = args.experts, args.hidden, args.intermediate
        cfg = ext.moe.MOEConfig(e, args.topk, h, i, 0)
        cfg.max_len = args.max_len
        cfg.pool = self.cpuinfer.backend_
        g = torch.Generator().manual_seed(1234)
        if method == "MXFP4":
            cls, self.selection = mxfp4_class(ext)
            shapes = {"gate": (e, i, h), "up": (e, i, h), "down": (e, h, i)}
            self.keep = {n: (torch.randint(0, 256, (a, r, c // 2), dtype=torch.uint8, generator=g).view(torch.int32),
                             (torch.rand(a, r, c // GROUP, generator=g) / 100 + 1e-3).to(torch.bfloat16))
                         for n, (a, r, c) in shapes.items()}
            cfg.quant_config.bits = 4
            cfg.quant_config.group_size = GROUP
            cfg.quant_config.zero_point = False
            cfg.gate_proj, cfg.gate_scale = (t.data_ptr() for t in self.keep["gate"])
            cfg.up_proj, cfg.up_scale = (t.data_ptr() for t in self.keep["up"])
            cfg.down_proj, cfg.down_scale = (t.data_ptr() for t in self.keep["down"])
        elif method == "AMXINT4":
            cls, self.selection = amxint4_class(ext)
            one = {"gate": (i, h), "up": (i, h), "down": (h, i)}
            # One expert's random weights copied into every slot: quantizing is
            # per expert anyway, and drawing 16 x 50 MB of normals takes longer
            # than the whole timing on a small machine.
            self.keep = {n: (torch.randn(*s, generator=g) / 50).to(torch.bfloat16).expand(e, *s).contiguous()
                         for n, s in one.items()}
            cfg.gate_proj = self.keep["gate"].data_ptr()
            cfg.up_proj = self.keep["up"].data_ptr()
            cfg.down_proj = self.keep["down"].data_ptr()
        else:
            raise ValueError(f"unknown method {method}")
        self.cls = cls.__name__
        self.moe = cls(cfg)
        self.p2l = torch.arange(e, dtype=torch.int64)
        self.cpuinfer.submit(self.moe.load_weights_task(self.p2l.data_ptr()))
        self.cpuinfer.sync()
        if method == "AMXINT4":
            self.keep = None  # quantized into the kernel's own buffers; the bf16 source can go
        self.inputs = {}

    def _inputs(self, qlen):
        if qlen not in self.inputs:
            torch = self.torch
            g = torch.Generator().manual_seed(7 + qlen)
            ids = torch.stack([torch.randperm(self.experts, generator=g)[: self.topk] for _ in range(qlen)])
            self.inputs[qlen] = (ids.to(torch.int64).contiguous(), torch.rand(qlen, self.topk, generator=g).contiguous(),
                                 (torch.randn(qlen, self.hidden, generator=g) / 10).to(torch.bfloat16).contiguous(),
                                 torch.empty(qlen, self.hidden, dtype=torch.bfloat16),
                                 torch.tensor([qlen], dtype=torch.int32))  # the kernel reads an int*
        return self.inputs[qlen]

    def forward(self, qlen):
        ids, w, x, out, n = self._inputs(qlen)
        self.cpuinfer.submit(self.moe.forward_task(n.data_ptr(), self.topk, ids.data_ptr(), w.data_ptr(),
                                                   x.data_ptr(), out.data_ptr(), False))
        self.cpuinfer.sync()
        return out

    def time(self, qlen, min_seconds, min_iters, warmup):
        """Wall milliseconds of each forward.

        Wall time, not CPU time: kt-kernel's pool threads spin while they
        wait for work, so their CPU time grows with the wait it would leave
        out (measured: 4-8 ms of CPU for a 0.1 ms forward on a busy machine).
        """
        for _ in range(warmup):
            self.forward(qlen)
        ms, t0 = [], time.perf_counter()
        while True:
            t = time.perf_counter()
            self.forward(qlen)
            ms.append(round((time.perf_counter() - t) * 1000, 4))
            if len(ms) >= min_iters and time.perf_counter() - t0 >= min_seconds:
                return ms


def mxfp4_class(ext):
    """The class sglang-kt's MXFP4 wrapper gets here (kt-kernel's own choice, KT_MXFP4_BACKEND honoured)."""
    try:
        from kt_kernel.utils import amx
        cls = amx._select_mxfp4_backend()
        if cls is not None:
            return cls, "kt_kernel.utils.amx._select_mxfp4_backend"
    except (ImportError, AttributeError):
        pass
    # Older or newer kt-kernel without that function: its documented order.
    for name in ("AMXFP4_KGroup_MOE", "AVX2MXFP4_MOE"):
        if hasattr(ext.moe, name):
            return getattr(ext.moe, name), "first of AMXFP4_KGroup_MOE, AVX2MXFP4_MOE"
    raise RuntimeError("this kt-kernel build has no MXFP4 MoE class (AMXFP4_KGroup_MOE or AVX2MXFP4_MOE)")


def amxint4_class(ext):
    """AMXInt4_MOE, what AMXMoEWrapper builds for --kt-method AMXINT4."""
    cls = getattr(ext.moe, "AMXInt4_MOE", None)
    if cls is None:
        raise RuntimeError("this kt-kernel build has no AMXInt4_MOE (kt-kernel builds it only with AVX512F+BW)")
    return cls, "kt_kernel_ext.moe.AMXInt4_MOE"


def emit(fd, obj):
    os.write(fd, (MARK + json.dumps(obj) + "\n").encode())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--intermediate", type=int, required=True)
    ap.add_argument("--topk", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--max-len", type=int, required=True, help="the largest qlen that will be timed")
    ap.add_argument("--method", action="append", choices=("MXFP4", "AMXINT4"), required=True)
    args = ap.parse_args(argv)
    sys.stdout.flush()
    out = os.dup(1)
    os.dup2(2, 1)  # kt-kernel's C++ chatter goes to stderr from here on
    t0 = time.perf_counter()
    ready = {"probe": "kt_tune", "ready": False, "pid": os.getpid(), "threads": args.threads,
             "override": os.environ.get("KT_KERNEL_CPU_VARIANT"), "methods": {}}
    layers = {}
    try:
        import torch
        torch.set_num_threads(1)  # torch only draws inputs; the MoE threads are kt-kernel's
        import kt_kernel
        from kt_kernel import kt_kernel_ext as ext
        ready.update(variant=str(kt_kernel.__cpu_variant__), kt_kernel_version=getattr(kt_kernel, "__version__", None),
                     import_seconds=round(time.perf_counter() - t0, 2))
        with torch.inference_mode():
            for method in args.method:
                t = time.perf_counter()
                try:
                    layer = Layer(ext, torch, method, args)
                    for q in sorted({1, args.max_len}):
                        y = layer.forward(q).float()
                        if not bool(torch.isfinite(y).all()) or float(y.abs().max()) == 0.0:
                            raise RuntimeError(f"the {layer.cls} forward at {q} token(s) gave a non-finite or all-zero output")
                    layers[method] = layer
                    ready["methods"][method] = {"ok": True, "class": layer.cls, "selection": layer.selection,
                                                "setup_seconds": round(time.perf_counter() - t, 2)}
                except Exception as e:  # noqa: BLE001 - one method failing leaves the others measurable
                    ready["methods"][method] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        ready["ready"] = True
    except Exception as e:  # noqa: BLE001 - reported; the caller decides
        ready["error"] = f"{type(e).__name__}: {e}"
    emit(out, ready)
    if not ready["ready"]:
        return 2
    with torch.inference_mode():
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                if cmd.get("cmd") == "quit":
                    break
                layer = layers[cmd["method"]]
                ms = layer.time(int(cmd["qlen"]), float(cmd.get("min_seconds", 0.2)), int(cmd.get("min_iters", 3)),
                                int(cmd.get("warmup", 1)))
                emit(out, {"method": cmd["method"], "qlen": int(cmd["qlen"]), "iters": len(ms), "ms": ms})
            except Exception as e:  # noqa: BLE001
                emit(out, {"error": f"{type(e).__name__}: {e}", "command": line.strip()[:200]})
    os.close(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
