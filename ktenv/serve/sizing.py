"""Size `launch` to the GPUs: --kt-num-gpu-experts and the memory flags it depends on.

One rule for every host, per GPU rank (sglang-kt 0.7.2's placement, see
envs/serve.toml and weights.py):

    headroom  = reserve + reserve_per_peer x (tp - 1) [+ the lazily allocated
                full-expert layer, on archs where sglang does not reserve it]
    fraction  = min(mem_fraction_max, floor_to_step(1 - headroom / gpu memory))
    static    = fraction x gpu memory            (--mem-fraction-static)
    available = static - weights without routed experts - layerwise-prefill
                reservation - EAGLE draft - KV cache for kv_tokens - margin
    experts   = floor(available / (MoE layers x one resident expert)), <= E

The workload (requests, KV tokens, context, CUDA-graph batch sizes) scales
with the GPU count (requests_per_gpu, graph_bs_per_gpu). Layerwise GPU prefill
is left off when its slots would take more than `layerwise_max_share` of the
static pool. When nothing fits, what the user did not ask for is given up in
this order, each with a note: the EAGLE draft (net-negative on a single
CPU-bound GPU upstream), then layerwise GPU prefill; then the command is
refused with the numbers. An
explicit flag after `--` is taken as given and checked against the same
budget; one that cannot fit is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import KtenvError
from . import weights as w
from .model import ModelFacts

GIB = 2**30
# The flags this module decides (a generated value replaces the profile's).
SIZED = ("kt-num-gpu-experts", "mem-fraction-static", "max-running-requests", "max-total-tokens",
         "context-length", "cuda-graph-bs", "cuda-graph-max-bs", "kt-gpu-prefill-token-threshold")


class SizingError(KtenvError):
    """The model does not fit the GPUs as asked."""


@dataclass
class Workload:
    requests: int
    kv_tokens: int
    context: int
    graph_bs: list[int]
    chunk: int
    threshold: int
    speculative: bool
    method: str


@dataclass
class Budget:
    """Bytes on one GPU rank; `available` is what is left for routed experts."""
    gpu: int
    tp: int
    fraction: float
    headroom_need: int
    non_expert: int
    reservation: int
    lazy_slot: int
    draft: int
    kv: int
    margin: int
    per_layer_expert: int  # one more --kt-num-gpu-experts costs this much on each rank

    @property
    def static(self) -> int:
        return int(self.fraction * self.gpu)

    @property
    def available(self) -> int:
        return self.static - self.non_expert - self.reservation - self.draft - self.kv - self.margin

    def fits(self, experts: int) -> bool:
        return self.available - experts * self.per_layer_expert >= 0

    def table(self, experts: int) -> str:
        g = lambda b: f"{b / GIB:6.2f} GiB"  # noqa: E731
        rows = [
            (f"GPU memory (x{self.tp})", g(self.gpu)),
            (f"outside the static pool (1 - {self.fraction:.2f})", g(self.gpu - self.static)
             + f"  (needs {self.headroom_need / GIB:.2f}: activations, graphs, buffers"
             + (f", {self.lazy_slot / GIB:.2f} lazy layer slot" if self.lazy_slot else "") + ")"),
            ("weights without routed experts", g(self.non_expert)),
            ("layerwise-prefill reservation", g(self.reservation)),
            ("EAGLE draft layer + its experts", g(self.draft)),
            ("KV cache", g(self.kv)),
            ("safety margin", g(self.margin)),
            (f"{experts} GPU experts/layer x {self.per_layer_expert / 2**20:.1f} MiB", g(experts * self.per_layer_expert)),
            ("left free in the static pool", g(self.available - experts * self.per_layer_expert)),
        ]
        return "\n".join(f"  {k:<48} {v}" for k, v in rows)


@dataclass
class Plan:
    experts: int
    budget: Budget
    workload: Workload
    flags: dict[str, list[str]]  # SIZED flag -> values
    notes: list[str] = field(default_factory=list)


def _num(given: dict, flag: str, kind=int):
    vals = given.get(flag)
    if not vals:
        return None
    try:
        return kind(vals[0])
    except ValueError:
        raise SizingError(f"--{flag} {vals[0]!r} is not a number.") from None


def workload(cfg: dict, tp: int, profile: dict, given: dict, speculative: bool, method: str) -> Workload:
    """Requests, KV tokens, context and graph sizes for tp GPUs; the user's flags win."""
    s = cfg["sizing"]
    requests = _num(given, "max-running-requests") or min(int(profile.get("max-running-requests", 4)),
                                                           s["requests_per_gpu"] * tp)
    tokens = _num(given, "max-total-tokens") or s["kv_tokens"]
    context = _num(given, "context-length") or tokens // requests
    if given.get("cuda-graph-bs"):
        graphs = [int(v) for v in given["cuda-graph-bs"]]
    else:
        top = min(requests, s["graph_bs_per_gpu"] * tp)
        graphs = [2**k for k in range(int(math.log2(top)) + 1)]
    chunk = _num(given, "chunked-prefill-size") or int(profile.get("chunked-prefill-size", 2048))
    threshold = _num(given, "kt-gpu-prefill-token-threshold")
    if threshold is None:
        threshold = int(profile.get("kt-gpu-prefill-token-threshold", 0))
    return Workload(requests, tokens, context, graphs, chunk, threshold, speculative, method.upper())


def budget(cfg: dict, m: ModelFacts, arch: str, gpu_bytes: int, tp: int, wl: Workload,
           fraction: float | None = None) -> Budget:
    s = cfg["sizing"]
    if m.inter % tp or (m.inter // tp) % 64:
        raise SizingError(f"The expert intermediate size {m.inter} does not split into {tp} parts of a multiple of 64, "
                          "which sglang-kt's MoE kernels need. Use a GPU count that divides it (1, 2, 8).")
    marlin = arch in s["layerwise_reserved_on"]
    layerwise = wl.threshold > 0
    reserved = layerwise and marlin and wl.method == "MXFP4"
    reservation = w.layerwise_reservation_bytes(m, tp) if reserved else 0
    lazy = w.lazy_slot_bytes(m, tp) if layerwise and not reserved else 0
    need = int((s["reserve_gib"] + s["reserve_per_peer_gib"] * (tp - 1)) * GIB) + lazy
    if fraction is None:
        step = s["mem_fraction_step"]
        fraction = min(s["mem_fraction_max"], math.floor(round((1 - need / gpu_bytes) / step, 6)) * step)
        fraction = round(max(fraction, 0.0), 2)
    draft = w.draft_bytes(m, tp, marlin, wl.threshold) if wl.speculative and s["draft_experts_on_gpu"] else 0
    swa = w.swa_ratio(wl.chunk, wl.kv_tokens)
    kv = int(wl.kv_tokens * w.kv_bytes_per_token(m, swa, wl.speculative))
    return Budget(gpu=gpu_bytes, tp=tp, fraction=fraction, headroom_need=need, non_expert=w.non_expert_bytes(m, tp),
                  reservation=reservation, lazy_slot=lazy, draft=draft, kv=kv,
                  margin=int(s["margin_fraction"] * gpu_bytes),
                  per_layer_expert=m.moe_layers * w.resident_expert_bytes(m, tp, wl.threshold))


def plan(cfg: dict, m: ModelFacts, arch: str, gpu_bytes: list[int], profile: dict, given: dict,
         speculative: bool, speculative_asked: bool, method: str = "MXFP4") -> Plan:
    """Size one launch. gpu_bytes: the memory of each GPU the server spans (the smallest rules).

    given: the user's flags after `--` ({flag without dashes: [values]});
    speculative_asked: the user asked for EAGLE explicitly (it is then not
    given up to make room).
    """
    if not gpu_bytes:
        raise SizingError("No GPU to size for.")
    tp, mem = len(gpu_bytes), min(gpu_bytes)
    notes: list[str] = list(m.notes)
    wl = workload(cfg, tp, profile, given, speculative, method)
    if wl.speculative and not speculative_asked and tp < cfg["sizing"]["speculative_min_gpus"]:
        wl = replace(wl, speculative=False)
        notes.append(f"Left out EAGLE speculative decoding on {tp} GPU: upstream measured it net-negative on one "
                     "CPU-bound GPU, and its draft keeps all routed experts on the GPU. `-- --speculative-algorithm "
                     "EAGLE` asks for it (and is then checked).")
    fraction = _num(given, "mem-fraction-static", float)
    b = budget(cfg, m, arch, mem, tp, wl, fraction)
    slots = b.reservation or b.lazy_slot
    share = cfg["sizing"]["layerwise_max_share"]
    if wl.threshold > 0 and "kt-gpu-prefill-token-threshold" not in given and slots > share * b.static:
        wl = replace(wl, threshold=0)
        b = budget(cfg, m, arch, mem, tp, wl, fraction)
        notes.append(f"Set --kt-gpu-prefill-token-threshold 0 (no layerwise GPU prefill): its full-expert layer slots "
                     f"would take {slots / GIB:.1f} GiB per GPU, more than {share:.0%} of the static pool, which "
                     "resident experts use better; long prompts prefill on the CPU experts (as the validated "
                     "single-RTX 5090 setting does). `-- --kt-gpu-prefill-token-threshold 4096` asks for it.")
    # Give up what was not asked for, in order, until the fixed costs fit.
    if b.available < 0 and wl.speculative and not speculative_asked:
        wl = replace(wl, speculative=False)
        b = budget(cfg, m, arch, mem, tp, wl, fraction)
        notes.append("Left out EAGLE speculative decoding: its draft layer keeps all "
                     f"{m.experts} of its routed experts on the GPU, which does not fit here with the rest; "
                     "upstream measured it net-negative on a single CPU-bound GPU anyway. `-- --speculative-algorithm "
                     "EAGLE` asks for it (and is then checked).")
    if b.available < 0 and wl.threshold > 0 and "kt-gpu-prefill-token-threshold" not in given:
        before = b.reservation or b.lazy_slot
        wl = replace(wl, threshold=0)
        b = budget(cfg, m, arch, mem, tp, wl, fraction)
        notes.append(f"Set --kt-gpu-prefill-token-threshold 0 (no layerwise GPU prefill): its full-expert layer slots "
                     f"({before / GIB:.1f} GiB per GPU) do not fit beside the weights; long prompts prefill on the CPU "
                     "experts instead.")
    if b.available < 0:
        raise SizingError(
            f"DeepSeek-V4 ({m.path}) does not fit {tp} GPU(s) of {mem / GIB:.1f} GiB even with no routed expert on "
            f"the GPU (--mem-fraction-static {b.fraction:.2f}), {-b.available / GIB:.2f} GiB short per GPU:\n"
            f"{b.table(0)}\nUse more or larger GPUs, or lower --max-total-tokens / --max-running-requests.")
    cap = m.experts
    if given.get("kt-gpu-experts-ratio"):
        # sglang-kt then ignores --kt-num-gpu-experts: int(MoE layers x E x ratio) experts in all.
        ratio = _num(given, "kt-gpu-experts-ratio", float)
        given = {**given, "kt-num-gpu-experts": [str(int(m.moe_layers * m.experts * ratio) // m.moe_layers)]}
        notes.append(f"--kt-gpu-experts-ratio {ratio} overrides --kt-num-gpu-experts in sglang-kt; checked as "
                     f"{given['kt-num-gpu-experts'][0]} experts per layer.")
    if given.get("kt-num-gpu-experts"):
        n = _num(given, "kt-num-gpu-experts")
        if n > cap:
            raise SizingError(f"--kt-num-gpu-experts {n} is more than the {cap} routed experts a layer has; "
                              "the value is per MoE layer in sglang-kt (the total is it x the MoE layer count).")
        if not b.fits(n):
            best = min(cap, b.available // b.per_layer_expert)
            raise SizingError(
                f"--kt-num-gpu-experts {n} does not fit {tp} GPU(s) of {mem / GIB:.1f} GiB: sglang-kt puts "
                f"{n} experts x {m.moe_layers} MoE layers on every GPU" + (f" (1/{tp} of each)" if tp > 1 else "") + ", "
                f"{n * b.per_layer_expert / GIB:.2f} GiB per GPU, and {-(b.available - n * b.per_layer_expert) / GIB:.2f} "
                f"GiB more than there is:\n{b.table(n)}\nAt most {best} fit; leave the flag out and launch sizes it.")
    else:
        n = min(cap, max(0, b.available // b.per_layer_expert))
        if n == cap:
            notes.append(f"All {cap} routed experts of every layer fit on these GPUs: KT-Kernel's CPU experts have "
                         "nothing to do here, and plain GPU serving may be simpler and faster.")
    if b.gpu - b.static < b.headroom_need:
        notes.append(f"--mem-fraction-static {b.fraction:.2f} leaves {(b.gpu - b.static) / GIB:.2f} GiB outside "
                     f"sglang's static pool; the server needs ~{b.headroom_need / GIB:.2f} GiB there at run time"
                     + (" (including the layer slot allocated at the first long prefill)" if b.lazy_slot else "")
                     + ", and may run out of memory after the start.")
    flags = {
        "kt-num-gpu-experts": [str(n)],
        "mem-fraction-static": [f"{b.fraction:.2f}"],
        "max-running-requests": [str(wl.requests)],
        "max-total-tokens": [str(wl.kv_tokens)],
        "context-length": [str(wl.context)],
        "cuda-graph-bs": [str(x) for x in wl.graph_bs],
        "cuda-graph-max-bs": [str(max(wl.graph_bs))],
        "kt-gpu-prefill-token-threshold": [str(wl.threshold)],
    }
    return Plan(n, b, wl, flags, notes)


def summary(p: Plan, m: ModelFacts) -> str:
    """The note launch prints: what was sized and the per-GPU budget behind it."""
    return (f"Sized for {p.budget.tp} GPU(s) of {p.budget.gpu / GIB:.1f} GiB and {m.layers} layers x {m.experts} "
            f"experts ({m.expert_format}, from {m.expert_format_from}): --kt-num-gpu-experts {p.experts} per layer, "
            f"--mem-fraction-static {p.budget.fraction:.2f}, {p.workload.requests} requests, KV for "
            f"{p.workload.kv_tokens} tokens, CUDA graphs for batch {' '.join(map(str, p.workload.graph_bs))}. Per GPU:\n"
            + p.budget.table(p.experts))


def check_threads(cpuinfer: int, nodes: list[dict]) -> None:
    """Refuse more KT-Kernel threads than physical cores (hyper-threads were ~10x slower upstream)."""
    physical = sum(n["physical_cores"] for n in nodes)
    logical = sum(n["logical_cpus"] for n in nodes)
    if cpuinfer > physical:
        ht = f" ({logical} logical CPUs: the rest are hyper-threads)" if logical > physical else ""
        raise SizingError(
            f"--kt-cpuinfer {cpuinfer} is more than the {physical} physical cores of this host{ht}. KT-Kernel's "
            "threads on hyper-threads thrash the memory-bound expert kernels: upstream measured ~28 -> 2.7 tok/s. "
            f"Use at most {physical}; leave the flag out and launch keeps one core per GPU rank free.")
