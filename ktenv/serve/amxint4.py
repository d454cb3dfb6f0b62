"""AMXINT4 expert weights: the manifest `build.py convert` leaves, the layout check, and what launch does with them.

A conversion (kt-kernel's convert_cpu_weights_ds4.py, `.kt` form) writes one
folder per layer and threadpool slot:

    Q/_layer_{L}/_numa_{N}/INT4_{gate,up,down}_{E}_{bytes}Byte_{quant,scale}_.kt

Slot N holds 1/P of every expert's intermediate size (P = --threadpool-count
at conversion), so the server must use the same P: kt-kernel looks for
_numa_0.._numa_{P'-1} and fails with a missing file (a merged-safetensors
conversion segfaults instead). ktenv records P and the source in
Q/ktenv-convert.json; launch reads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import KtenvError
from .model import ModelFacts

MANIFEST = "ktenv-convert.json"
FILE = re.compile(r"INT4_(gate|up|down)_(\d+)_(\d+)Byte_(quant|scale)_\.kt$")


class AmxInt4Error(KtenvError):
    """Converted weights are missing, incomplete, or do not match the launch."""


def expected_sizes(m: ModelFacts, pools: int) -> dict[tuple[str, str], int]:
    """Bytes of each file of one expert in one slot: int4 values (2 a byte) and one fp32 scale per output row.

    gate/up are [I/P, H] per slot; down is [H, I/P] (its rows are whole, so
    its scale is per hidden row in every slot).
    """
    i = m.inter // pools
    return {("gate", "quant"): m.hidden * i // 2, ("up", "quant"): m.hidden * i // 2,
            ("down", "quant"): m.hidden * i // 2,
            ("gate", "scale"): 4 * i, ("up", "scale"): 4 * i, ("down", "scale"): 4 * m.hidden}


def output_bytes(m: ModelFacts, pools: int) -> int:
    return m.layers * m.experts * pools * sum(expected_sizes(m, pools).values())


def check_layout(out: Path, m: ModelFacts, pools: int) -> dict:
    """Every layer, slot, projection and expert present with the size the expert shape gives.

    {"files": n, "bytes": n, "problems": [sentences]}; also flags extra
    _numa_ folders (a conversion with a larger threadpool count).
    """
    want = expected_sizes(m, pools)
    problems: list[str] = []
    files = total = 0
    for layer in range(m.layers):
        ldir = out / f"_layer_{layer}"
        if not ldir.is_dir():
            problems.append(f"layer {layer} is missing ({ldir.name}/)")
            continue
        slots = sorted(p.name for p in ldir.glob("_numa_*"))
        if slots != [f"_numa_{n}" for n in range(pools)]:
            problems.append(f"layer {layer} has threadpool slots {slots or 'none'}, expected _numa_0.._numa_{pools - 1}")
        for n in range(pools):
            seen: dict[tuple[str, str, int], int] = {}
            sdir = ldir / f"_numa_{n}"
            for f in (sdir.iterdir() if sdir.is_dir() else []):
                mt = FILE.match(f.name)
                if not mt:
                    continue
                proj, expert, named, kind = mt.group(1), int(mt.group(2)), int(mt.group(3)), mt.group(4)
                size = f.stat().st_size
                seen[(proj, kind, expert)] = size
                files, total = files + 1, total + size
                if size != named or size != want[(proj, kind)]:
                    problems.append(f"{f.relative_to(out)}: {size} bytes, expected {want[(proj, kind)]} "
                                    f"(hidden {m.hidden}, intermediate {m.inter} / {pools} slots)")
            missing = [f"{p}/{k} of expert {e}" for e in range(m.experts) for (p, k) in want if (p, k, e) not in seen]
            if missing:
                problems.append(f"layer {layer} slot {n} lacks {len(missing)} file(s), e.g. {', '.join(missing[:3])}")
    return {"files": files, "bytes": total, "problems": problems[:20] + ([f"... {len(problems) - 20} more"] if len(problems) > 20 else [])}


def read_manifest(path: str | Path | None) -> dict | None:
    """The manifest in a --kt-weight-path, or None when it is not a ktenv conversion."""
    if not path:
        return None
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise AmxInt4Error(f"{f} is not valid JSON ({e}); the conversion was interrupted or edited. "
                           "Convert again into an empty --output.") from None
    if data.get("method") != "AMXINT4" or not isinstance(data.get("threadpool_count"), int):
        raise AmxInt4Error(f"{f} does not describe an AMXINT4 conversion (method {data.get('method')!r}, "
                           f"threadpool_count {data.get('threadpool_count')!r}).")
    return data


def check_method(given: dict, manifest: dict | None, weight_path: str) -> None:
    """Refuse --kt-method AMXINT4 on weights that were never converted (kt-kernel would look for .kt files)."""
    method = (given.get("kt-method") or [""])[0].upper()
    if manifest is not None and method and method != "AMXINT4":
        raise AmxInt4Error(f"--kt-weight-path {weight_path} holds AMXINT4 experts converted by ktenv, but the command "
                           f"asks for --kt-method {method}; kt-kernel would read them as {method} and fail. Drop "
                           "--kt-method (launch picks AMXINT4), or point --kt-weight-path at the model for MXFP4.")
    if method == "AMXINT4" and manifest is None:
        raise AmxInt4Error(
            f"--kt-method AMXINT4 reads INT4 experts converted for a threadpool count, and {weight_path} has no "
            f"ktenv conversion ({MANIFEST}). Convert first: python build.py convert --arch ARCH --model MODEL "
            "--output DIR --kt-source KTRANSFORMERS_CHECKOUT, then launch with --kt-weight-path DIR.")


def threadpool_for_launch(manifest: dict, given: dict, nodes: list[dict], tp: int, notes: list[str]) -> tuple[int, int]:
    """(--kt-threadpool-count, --kt-cpuinfer) for converted weights: the conversion's count, threads split over it."""
    pools = manifest["threadpool_count"]
    asked = given.get("kt-threadpool-count")
    if asked and asked[0] != str(pools):
        raise AmxInt4Error(
            f"--kt-threadpool-count {asked[0]} does not match the {pools} threadpool slot(s) the AMXINT4 weights were "
            f"converted for ({manifest.get('output', 'the --kt-weight-path')}): each slot holds 1/{pools} of every "
            "expert, and kt-kernel fails with a missing _numa_ file (a merged conversion segfaults). Leave the flag "
            f"out (launch uses {pools}), or convert again with --threadpool-count {asked[0]}.")
    physical = sum(n["physical_cores"] for n in nodes)
    per_pool = max(1, (physical - max(1, tp)) // pools)
    if pools != len(nodes):
        notes.append(f"The AMXINT4 weights were converted for {pools} threadpool slot(s) and this host has "
                     f"{len(nodes)} NUMA node(s); launch uses {pools} so the weights load (convert on this host for "
                     "one pool per node).")
    return pools, per_pool * pools


def launch_flags(manifest: dict, given: dict, notes: list[str], cfg: dict) -> dict:
    """The profile flags an AMXINT4 launch replaces, and the warnings it must carry."""
    flags = {"kt-method": "AMXINT4"}
    if "kt-gpu-prefill-token-threshold" not in given:
        # kt_ep_wrapper.SharedFullContext._build_layers wraps the full-layer GPU
        # prefill method for MXFP4 experts only when --kt-method is MXFP4; with
        # AMXINT4 it would be built with FP8 shapes for MXFP4 weights.
        flags["kt-gpu-prefill-token-threshold"] = 0
        notes.append("--kt-gpu-prefill-token-threshold 0 with AMXINT4: sglang-kt 0.7.2 builds its layerwise GPU "
                     "prefill for MXFP4 expert weights only under --kt-method MXFP4; AMXINT4's strength is CPU "
                     "prefill anyway.")
    notes.append(warning(cfg, manifest))
    return flags


def warning(cfg: dict, manifest: dict | None = None) -> str:
    """What AMXINT4 costs and buys, said wherever it is chosen (convert and launch)."""
    c = cfg["convert"]
    measured = (manifest or {}).get("check", {}).get("rel_l1_vs_mxfp4")
    return (f"AMXINT4 is lossy: one INT4 scale per output row is coarser than MXFP4's 32-value groups "
            f"(~{c['lossy_rel_diff']:.0%} relative output difference from the MXFP4 experts on random weights"
            + (f"; {measured:.0%} on this conversion's checked layer" if measured is not None else "") + "). "
            "sglang-kt drops DeepSeek-V4's SwiGLU clamp (limit 10, SGLANG_DSV4_2604_SUBMODE=2604B) for AMXINT4 CPU "
            f"experts. Decode does not get faster (memory-bound: {c['decode_tok_s'][0]} vs {c['decode_tok_s'][1]} "
            f"tok/s upstream, within noise); prefill does ({c['prefill32_tok_s'][0]} vs {c['prefill32_tok_s'][1]} "
            "tok/s at 32 tokens, on an AMX CPU).")
