"""`python build.py convert`: DeepSeek-V4's MXFP4 routed experts -> AMXINT4 CPU weights.

    python build.py convert --arch sm90 --model /models/DeepSeek-V4-Flash \\
        --output /models/DeepSeek-V4-Flash-AMXINT4 --kt-source ~/src/ktransformers

Runs the checkout's kt-kernel/scripts/convert_cpu_weights_ds4.py (not in the
kt-kernel wheel) inside the env, in its `.kt` form, with the threadpool
count launch will use on this host (one slot per NUMA node) and the host's
physical cores; then checks the result: every layer, slot, projection and
expert file present with the size the expert shape gives, and one layer
loaded with kt-kernel's AMXInt4_MOE and compared with a torch emulation of
INT4 (probes/convert_probe.py). The output is written beside --output and
renamed into place when everything passed, with ktenv-convert.json (source,
threadpool count, check results) that `launch --kt-weight-path` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from .. import probe
from ..errors import KtenvError
from ..host.facts import HostFacts, live_facts, numa_summary
from ..progress import Progress
from ..target import Target
from . import amxint4, sizing
from . import model as modelmod

PARTIAL = ".ktenv-partial-"


class ConvertError(KtenvError):
    """The conversion cannot run, or its output did not pass the check."""


def source_id(m: modelmod.ModelFacts) -> dict:
    """What identifies the input: config.json's hash and every safetensors file's name and size."""
    root = Path(m.path)
    files = sorted((p.name, p.stat().st_size) for p in root.glob("*.safetensors"))
    return {"model": str(root.resolve()), "config_sha256": hashlib.sha256((root / "config.json").read_bytes()).hexdigest(),
            "safetensors": [list(f) for f in files]}


def _stream(python: Path, args: list[str], progress, timeout: float | None = None) -> dict:
    """Run probes/convert_probe.py, passing the script's own progress lines on; its report."""
    def relay(line: str) -> None:
        if line.startswith(("Processing layer", "ktenv:", "Found ", "Conversion")):
            progress("  " + line.strip())

    run = probe.stream(python, "convert_probe.py", args, on_line=relay, timeout=timeout,
                       env=probe.child_env(None, {"PYTHONUNBUFFERED": "1"}))
    if run.result is None:
        raise ConvertError(f"convert_probe.py {run.why}")
    return {**run.result, "output_tail": run.tail}


def _clean_partials(out: Path, progress) -> None:
    """Remove what an interrupted conversion of the same --output left beside it."""
    for p in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            raise ConvertError(f"Another conversion into {out} is running (process {pid}, writing {p}). Wait for it.")
        progress(f"removing {p.name}, left by an interrupted conversion")
        shutil.rmtree(p, ignore_errors=True)


def _existing(out: Path, src: dict, pools: int) -> dict | None:
    """The manifest of a finished conversion of the same input in `out`; refuse anything else non-empty."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConvertError(f"--output {out} exists and is not a directory. Give a new directory.")
    if not any(out.iterdir()):
        return None
    man = amxint4.read_manifest(out)
    if man is None:
        raise ConvertError(f"--output {out} is not empty and holds no ktenv conversion ({amxint4.MANIFEST}); "
                           "ktenv does not write into it. Give a new or empty directory.")
    if man.get("source") != src:
        raise ConvertError(f"--output {out} holds a conversion of another input ({man.get('source', {}).get('model')}, "
                           "or the checkpoint's files changed since). Give another --output, or remove it.")
    if man["threadpool_count"] != pools:
        raise ConvertError(f"--output {out} holds this model converted for {man['threadpool_count']} threadpool slot(s), "
                           f"not {pools}. Give another --output for {pools}, or launch with the existing one.")
    return man


def convert(target: Target, model: str, output: str, kt_source: str, facts: HostFacts | None = None,
            pools: int | None = None, threads: int | None = None, progress=None) -> dict:
    """Convert, check and install; returns the manifest (with "reused": True when nothing had to be done).
    The script runs in target's env (torch, kt-kernel)."""
    t0 = time.perf_counter()
    progress = progress or Progress()
    cfg = target.spec.knowledge.serve
    python = target.require_env().python
    m = modelmod.read(model)
    if m.expert_format not in ("mxfp4", "unknown"):
        raise ConvertError(f"{model}'s routed experts are {m.expert_format} ({m.expert_format_from}); this conversion "
                           "reads DeepSeek-V4-Flash's MXFP4 experts (--input-type fp4).")
    script = Path(kt_source) / cfg["convert"]["script"]
    if not script.is_file():
        raise ConvertError(f"{script} does not exist. --kt-source must be a ktransformers checkout (git clone "
                           "https://github.com/kvcache-ai/ktransformers): the conversion script is not in the "
                           "kt-kernel wheel and kt-kernel has no sdist on PyPI.")
    facts = facts or live_facts(str(Path(output).parent))
    nodes = numa_summary(facts)
    pools = pools or len(nodes)
    physical = sum(n["physical_cores"] for n in nodes)
    threads = threads or max(pools, physical // pools * pools)
    if threads > physical:
        sizing.check_threads(threads, nodes)
    out = Path(output).absolute()
    src = source_id(m)
    man = _existing(out, src, pools)
    if man is not None:
        progress(f"{out} is already this model converted for {pools} threadpool slot(s); nothing to do")
        return {**man, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_partials(out, progress)
    need = amxint4.output_bytes(m, pools)
    free = shutil.disk_usage(out.parent).free
    if free < need * 1.05:
        raise ConvertError(f"{out.parent} has {free / 1e9:.1f} GB free; the AMXINT4 experts take {need / 1e9:.1f} GB "
                           f"({m.layers} layers x {m.experts} experts). Free space or choose another --output.",
                           exit_code=4)
    tmp = out.parent / f".{out.name}{PARTIAL}{os.getpid()}"
    progress(f"converting {m.layers} layers x {m.experts} experts (hidden {m.hidden}, intermediate {m.inter}) "
                  f"with {threads} threads into {pools} threadpool slot(s), {need / 1e9:.2f} GB")
    try:
        run = _stream(python, ["run", str(script), "--", "--input-path", str(Path(model).absolute()),
                               "--input-type", "fp4", "--output", str(tmp), "--quant-method", "int4", "--cpuinfer-threads",
                               str(threads), "--threadpool-count", str(pools), "--no-merge-safetensor"], progress)
        if not run.get("ok"):
            raise ConvertError(f"{script.name} failed (exit {run.get('exit_code')}): {run.get('error') or ''}\n  "
                               + "\n  ".join(run.get("output_tail", [])[-8:]))
        progress("checking every layer, slot and expert file against the expert shape")
        layout = amxint4.check_layout(tmp, m, pools)
        if layout["problems"]:
            raise ConvertError(f"The conversion is incomplete: {'; '.join(layout['problems'])}.")
        progress(f"  {layout['files']} files, {layout['bytes'] / 1e9:.2f} GB, all present")
        progress("loading layer 0 with kt-kernel's AMXInt4_MOE and comparing with a torch INT4 emulation")
        chk = _stream(python, ["check", str(Path(model).absolute()), str(tmp), "--layer", "0",
                               "--threadpool", str(pools), "--threads", str(max(1, min(threads, (os.cpu_count() or 2) - 1))),
                               "--topk", str(min(m.topk, m.experts))], progress)
        tol = cfg["convert"]["emulation_tolerance"]
        if not chk.get("ok"):
            raise ConvertError(f"kt-kernel could not load or run the converted layer 0: {chk.get('error')}")
        worst = max(c["rel_l1_vs_int4_emulation"] for c in chk["cases"])
        if worst > tol or not all(c["finite"] for c in chk["cases"]):
            raise ConvertError(f"Layer 0 as kt-kernel loads it differs from the INT4 emulation of the source experts by "
                               f"{worst:.1%} (tolerance {tol:.0%}): the files do not hold this model's experts as "
                               "AMXINT4 expects. Nothing was installed.")
        for c in chk["cases"]:
            progress(f"  {c['qlen']} token(s): {c['rel_l1_vs_int4_emulation']:.2%} from the INT4 emulation, "
                     f"{c['rel_l1_vs_mxfp4']:.1%} from the MXFP4 experts")
        manifest = {
            "ktenv": 1, "method": "AMXINT4", "format": "kt", "threadpool_count": pools, "cpuinfer": threads,
            "output": str(out), "source": src,
            "shape": {"layers": m.layers, "experts": m.experts, "hidden": m.hidden, "intermediate": m.inter},
            "script": {"path": cfg["convert"]["script"], "sha256": hashlib.sha256(script.read_bytes()).hexdigest()},
            "pin_memory_workaround": run.get("workaround"),
            "layout": {"files": layout["files"], "bytes": layout["bytes"]},
            "check": {"layer": 0, "variant": chk.get("variant"), "cases": chk["cases"], "tolerance": tol,
                      "rel_l1_vs_mxfp4": max(c["rel_l1_vs_mxfp4"] for c in chk["cases"])},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / amxint4.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"done: {out}")
    return manifest


def render(man: dict, target: Target) -> str:
    """The human report of a conversion (the --json output is the manifest)."""
    cfg = target.spec.knowledge.serve
    work = man.get("pin_memory_workaround") or {}
    lines = [f"convert: {man['output']} holds {man['shape']['layers']} layers x {man['shape']['experts']} experts as "
             f"AMXINT4 for {man['threadpool_count']} threadpool slot(s)" + (" (already converted)" if man.get("reused") else "")]
    if work.get("active"):
        lines.append(f"  no NVIDIA driver here: kt-kernel's pin_memory=True was ignored ({work['pinned_requests_dropped']} "
                     "allocations; pinning only serves GPU copies, which the conversion does not make)")
    lines.append(f"  check: layer 0 within {man['check']['tolerance']:.0%} of an INT4 emulation "
                 f"({', '.join(str(c['rel_l1_vs_int4_emulation']) for c in man['check']['cases'])})")
    lines.append(f"  note: {amxint4.warning(cfg, man)}")
    lines.append(f"  serve: python build.py launch --arch {target.arch.name} --model {man['source']['model']} "
                 f"--kt-weight-path {man['output']}  (picks --kt-method AMXINT4 --kt-threadpool-count {man['threadpool_count']})")
    return "\n".join(lines)
