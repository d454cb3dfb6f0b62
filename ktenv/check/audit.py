"""`python build.py audit`: which GPU architectures the env's CUDA binaries carry.

Every shared object and cubin in the env is listed with NVIDIA's cuobjdump
(`-lelf` for SASS, `-lptx` for PTX); results are cached by the file's sha256,
so a second audit of the same files (another env hard-linked from uv's cache,
a rerun) costs only the hashing. cuobjdump comes from PyPI
(nvidia-cuda-cuobjdump, installed into a small tool venv under ktenv's cache
unless ktenv's own environment or $KTENV_CUOBJDUMP provides one).

A binary can run on compute capability X.Y when it has
  SASS sm_XY' with the same major and minor <= Y ('a' variants: exactly X.Y;
  'f' family variants: same major, minor <= Y), or
  PTX compute_XY' with XY' <= XY, which the driver JIT-compiles ('a': exactly X.Y).
The audit fails, naming the binary, when one that the arch's code path loads
has neither. What "loads" means follows the real loaders: sgl_kernel's
load_utils.py takes sm90/common_ops on 9.0 and sm100/common_ops (from the
payload) on every other capability; torch loads its CUDA libraries and the
nvidia-* runtime; flashinfer's TRT-LLM MoE cubins load on the trtllm_fp4 path.
Everything else is reported, marked as loaded on demand or not at all.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from .. import probe
from ..spec import Arch
from ..spec.model import Loaders
from ..target import Target
from ..tools import cache_dir
from .cudacode import coverage, parse_code
from .cuobjdump import WORKERS, AuditError, Cache, find_cuobjdump, scan, tool_version


# Where probes/audit_probe.py looks for each JIT compiler (relative to site-packages), and what it looks for.
JIT_HOME = {"ptxas": "triton/backends/nvidia/bin", "nvrtc": "nvidia/cuda_nvrtc/lib"}
JIT_FILE = {"ptxas": "ptxas", "nvrtc": "libnvrtc.so.*"}


# --- what loads on this arch ----------------------------------------------------------

@dataclass
class Role:
    kind: str  # "loaded", "on-demand", "not-loaded"
    why: str
    group: str = ""  # binaries reported together (12,000 flashinfer cubins are one line per directory)


def role(rel: str, arch: Arch, loaders: Loaders) -> Role:
    """How the env's loaders treat the binary at `rel` (relative to site-packages) on `arch`."""
    m = re.search(r"(?:^|/)sgl_kernel/(sm\d+)/common_ops\.", rel)
    if m:
        pick = loaders.common_ops_dir(arch.compute_capability)
        if m.group(1) == pick:
            return Role("loaded", f"sgl_kernel/load_utils.py loads {pick}/common_ops on compute capability "
                                  f"{arch.compute_capability} (envs/loaders.toml [sgl_kernel])")
        return Role("not-loaded", f"load_utils.py takes {pick}/, not {m.group(1)}/, on {arch.compute_capability}")
    if re.search(r"(?:^|/)sgl_kernel/flash_ops\.", rel):
        return Role("on-demand", "FA3 (sgl_kernel.flash_attn), used by sglang's fa3 attention backend; "
                                 "DeepSeek-V4 runs its own compressed-attention backend")
    if re.search(r"(?:^|/)sgl_kernel/\w+_ops\.", rel):
        return Role("on-demand", "an optional sgl_kernel extension, imported by the backend that needs it")
    for pattern, why in loaders.audit_loaded:
        if re.match(pattern, rel):
            return Role("loaded", why)
    if rel.startswith(("torch/lib/", "nvidia/")):
        note = next((f" ({n})" for p, n in loaders.audit_blind if re.match(p, rel)), "")
        return Role("on-demand", "a CUDA library torch links; its kernels run only when torch calls into it" + note)
    m = re.match(r"flashinfer_cubin/cubins/[^/]+/([^/]+)/", rel)
    if m:
        group = "flashinfer_cubin/" + re.sub(r"-[0-9a-f]{7}(-[0-9a-f]{7})?$", "", m.group(1))
        if "batched_gemm" in m.group(1) and arch.paths.get("mxfp4_moe") == "trtllm_fp4":
            return Role("loaded", "TRT-LLM MoE cubins: the trtllm_fp4 MXFP4 MoE path loads them", group)
        return Role("on-demand", "loaded by flashinfer only for the TRT-LLM kernel that needs it", group)
    return Role("on-demand", "not on the DeepSeek-V4 serving path as far as ktenv knows")


# --- the audit ---------------------------------------------------------------------

def probe_env(python: Path) -> dict:
    run = probe.run(python, "audit_probe.py", timeout=120)
    if run.result is None:
        raise AuditError(f"{python} could not run the audit probe: it {run.why}")
    return run.result


def _codes(d: dict) -> str:
    parts = [f"{c}" + (f"x{n}" if n > 1 else "") for c, n in sorted(d.items(), key=lambda kv: parse_code(kv[0]))]
    return " ".join(parts) or "-"


def audit(target: Target, cuobjdump: str | None = None, how: str = "", cache_path: Path | None = None,
          extra_roots: list[Path] | None = None, workers: int = WORKERS, python: Path | None = None) -> dict:
    """Every binary of the env with the code it carries, judged against target.arch's loaders."""
    t0 = time.monotonic()
    arch, loaders = target.arch, target.spec.knowledge.loaders
    python = python or target.require_env().python
    info = probe_env(python)
    site = Path(info["site"])
    roots = [site] + list(extra_roots or [])
    root = info.get("payload_root")
    if root and not Path(root).resolve().is_relative_to(site.resolve()):
        roots.append(Path(root))
    if cuobjdump is None:
        cuobjdump, how = find_cuobjdump()
    version = tool_version(cuobjdump)
    cache = Cache(cache_path or cache_dir() / "audit" / f"cuobjdump-{version}.json")
    entries, timing = scan(roots, cuobjdump, cache, workers)
    cache.save()
    cc = arch.cc
    binaries, groups, failures, no_device = [], {}, [], []
    for e in entries:
        path = Path(e["path"])
        rel = str(path.relative_to(site)) if path.is_relative_to(site) else str(path)
        if e.get("error"):
            failures.append({"binary": rel, "why": f"cuobjdump could not read it: {e['error']}"})
            continue
        if not e["device_code"]:
            no_device.append(rel)
            continue
        r = role(rel, arch, loaders)
        cov = coverage(e, cc)
        if r.group:
            g = groups.setdefault(r.group, {"group": r.group, "role": r.kind, "why": r.why, "files": 0, "covered": 0,
                                            "sass": {}, "ptx": {}, "bytes": 0, "uncovered_example": None})
            g["files"] += 1
            g["bytes"] += e["bytes"]
            g["covered"] += cov["ok"]
            for k in ("sass", "ptx"):
                for c, n in e[k].items():
                    g[k][c] = g[k].get(c, 0) + n
            if not cov["ok"] and g["uncovered_example"] is None:
                g["uncovered_example"] = rel
            continue
        item = {"binary": rel, "bytes": e["bytes"], "role": r.kind, "why": r.why, "sass": e["sass"], "ptx": e["ptx"],
                "runs_on_arch": cov["ok"], "via": "SASS " + _codes(cov["sass"]) if cov["sass"] else
                ("PTX JIT from " + _codes(cov["ptx"]) if cov["ptx"] else "nothing")}
        binaries.append(item)
        if r.kind == "loaded" and not cov["ok"]:
            failures.append({"binary": rel, "why": f"{r.why}, but it has SASS {_codes(e['sass'])} and PTX "
                                                   f"{_codes(e['ptx'])}: nothing runs on compute capability {arch.compute_capability}"})
    pick = loaders.common_ops_dir(arch.compute_capability)
    if (site / "sgl_kernel").is_dir() and not any(
            b["role"] == "loaded" and re.search(r"sgl_kernel/sm\d+/common_ops\.", b["binary"]) for b in binaries):
        failures.append({"binary": f"sgl_kernel/{pick}/common_ops.abi3.so",
                         "why": f"sgl_kernel loads {pick}/common_ops on compute capability {arch.compute_capability}, and it is "
                                "not on disk (for sm100/ it comes from the split payload, which this env has not extracted), "
                                f"so it could not be audited; `{target.build_hint()} --repair` places it"})
    for g in groups.values():
        g["runs_on_arch"] = g["covered"] == g["files"]
        if g["role"] == "loaded" and not g["runs_on_arch"]:
            failures.append({"binary": g["uncovered_example"],
                             "why": f"{g['why']}, but {g['files'] - g['covered']} of {g['files']} cubins in {g['group']} "
                                    f"have no code for compute capability {arch.compute_capability} (SASS {_codes(g['sass'])})"})
    jit = []
    for key, what in (("ptxas", "triton's ptxas (Triton kernels: triton_kernels MoE, sparse-MLA fallback)"),
                      ("nvrtc", "NVRTC (deep_gemm, tilelang and cuda-python JIT)")):
        j = info.get(key) or {}
        if not j.get("found"):
            home = site / JIT_HOME[key]
            if home.is_dir() and not j.get("error"):
                # Its package is installed but the compiler file is gone: a damaged env, not a lock without it.
                why = f"{JIT_HOME[key]}/ is installed but holds no {JIT_FILE[key]}: a file of the env was deleted"
                jit.append({"compiler": what, "ok": False, "evidence": why})
                failures.append({"binary": JIT_HOME[key], "why": f"{what}: {why}; `{target.build_hint()} --repair` reinstalls it"})
                continue
            jit.append({"compiler": what, "ok": None, "evidence": j.get("error", "not in this env")})
            continue
        sm = f"sm_{arch.sm_number}"
        ok = sm in j["archs"]
        jit.append({"compiler": what, "ok": ok, "version": j["version"],
                    "evidence": f"{j['version']} targets {sm}" if ok else f"{j['version']} cannot target {sm} "
                    f"(knows {', '.join(j['archs'][-6:])})"})
        if not ok:
            failures.append({"binary": j.get("path") or j.get("library"),
                             "why": f"{what} {j['version']} cannot compile for {sm}"})
    return {"arch": arch.name, "compute_capability": arch.compute_capability, "site": str(site), "roots": [str(r) for r in roots],
            "cuobjdump": {"path": cuobjdump, "version": version, "from": how}, "cache": str(cache.path),
            "timing": {**timing, "total_s": round(time.monotonic() - t0, 1)}, "ok": not failures, "failures": failures,
            "binaries": sorted(binaries, key=lambda b: (b["role"] != "loaded", b["binary"])),
            "groups": sorted(groups.values(), key=lambda g: g["group"]), "jit": jit,
            "without_device_code": len(no_device),
            "sgl_kernel_loader": f"{pick}/common_ops on compute capability {arch.compute_capability}"}


def render(r: dict, show_all: bool = False) -> str:
    out = [f"audit {r['arch']} (compute capability {r['compute_capability']}) of {r['site']}",
           f"cuobjdump {r['cuobjdump']['version']} from {r['cuobjdump']['from']}",
           f"{r['timing']['files']} binaries: hashed in {r['timing']['hash_s']} s, {r['timing']['listed']} listed by cuobjdump "
           f"in {r['timing']['cuobjdump_s']} s, {r['timing']['cached']} from the cache; {r['without_device_code']} without device code",
           f"sgl_kernel loads {r['sgl_kernel_loader']}", ""]
    mark = {True: "ok  ", False: "NONE"}
    quiet = 0
    for b in r["binaries"]:
        if not show_all and (b["role"] == "not-loaded" or (b["role"] == "on-demand" and b["runs_on_arch"])):
            quiet += b["role"] == "on-demand"
            continue
        why = "" if b["runs_on_arch"] else f"\n       {b['why']}"
        out.append(f"  {mark[b['runs_on_arch']]} [{b['role']}] {b['binary']}: {b['via']}  (SASS {_codes(b['sass'])}; PTX {_codes(b['ptx'])}){why}")
    for g in r["groups"]:
        gm = mark[True] if g["runs_on_arch"] else ("part" if g["covered"] else mark[False])
        out.append(f"  {gm} [{g['role']}] {g['group']}: {g['covered']}/{g['files']} cubins run here (SASS {_codes(g['sass'])})")
    if quiet:
        out.append(f"  ({quiet} more binaries loaded on demand run here; --json lists every binary)")
    not_loaded = [b for b in r["binaries"] if b["role"] == "not-loaded"]
    if not_loaded and not show_all:
        out.append(f"  ({len(not_loaded)} binar{'y' if len(not_loaded) == 1 else 'ies'} this arch never loads: "
                   + ", ".join(b["binary"] for b in not_loaded) + ")")
    for j in r["jit"]:
        out.append(f"  {'ok  ' if j['ok'] else ('NONE' if j['ok'] is False else '?   ')} [jit] {j['compiler']}: {j['evidence']}")
    out.append("")
    if r["failures"]:
        out.append(f"FAILED: {len(r['failures'])} binar{'y' if len(r['failures']) == 1 else 'ies'} the {r['arch']} path loads cannot run there:")
        out += [f"  {f['binary']}: {f['why']}" for f in r["failures"]]
    else:
        out.append(f"every binary the {r['arch']} path loads has SASS or PTX for compute capability {r['compute_capability']}")
    return "\n".join(out)
