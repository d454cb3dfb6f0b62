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

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import launch
from . import spec as specmod
from .errors import KtenvError
from .tools import cache_dir, uv_bin

PROBE = Path(__file__).parent / "probes" / "audit_probe.py"
MARK = "KTENV-RESULT "
# nvidia-cuda-cuobjdump-cu12 is not published; the CUDA 13 cuobjdump reads
# CUDA 12 fatbins (compressed ones included) and knows every arch ktenv builds for.
CUOBJDUMP_REQ = "nvidia-cuda-cuobjdump==13.5.37"
CUOBJDUMP_HASHES = (
    "sha256:31c582f5ef4d5eeb86e08dcd30b48031e4892140f523145ba18edd3a6375be43",
    "sha256:38780fee50863252a0b8926357faa91615ca1c8346490563f33a06100cd73f58",
    "sha256:b65a561d917fb5e42ff53080b995208f2dba17498964f70aa1d8c48ec5feaba4",
    "sha256:f48e3148535365161a268547b285fd01d92c80e4b457275375933825b5fc26b2",
)
WORKERS = 2
BINARY = re.compile(r"\.(so(\.\d+)*|cubin|fatbin)$")
CODE = re.compile(r"\b(ELF|PTX) file\s+\d+: \S*?\.(sm_\d+[af]?)\.(cubin|ptx)\b")


class AuditError(KtenvError):
    """cuobjdump is missing or refuses a file."""


# --- compatibility ---------------------------------------------------------------

def parse_code(code: str) -> tuple[int, int, str]:
    """'sm_90a' -> (9, 0, 'a'); 'sm_120' -> (12, 0, ''); 'sm_86' -> (8, 6, '')."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([af]?)", code)
    if not m:
        raise ValueError(f"not a CUDA arch code: {code!r}")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def runs_on(code: str, cc: tuple[int, int], kind: str) -> bool:
    """Can `kind` ('sass' or 'ptx') built for `code` run on compute capability cc?"""
    major, minor, suffix = parse_code(code)
    if suffix == "a":  # arch-specific features: that capability only
        return (major, minor) == cc
    if suffix == "f" or kind == "sass":  # family / binary compatibility: same major, newer minor
        return major == cc[0] and minor <= cc[1]
    return (major, minor) <= cc  # PTX JIT-compiles forward


def coverage(codes: dict, cc: tuple[int, int]) -> dict:
    """codes = {"sass": {code: n}, "ptx": {code: n}} -> what of it runs on cc."""
    sass = {c: n for c, n in codes.get("sass", {}).items() if runs_on(c, cc, "sass")}
    ptx = {c: n for c, n in codes.get("ptx", {}).items() if runs_on(c, cc, "ptx")}
    return {"ok": bool(sass or ptx), "sass": sass, "ptx": ptx}


# --- cuobjdump ---------------------------------------------------------------------

def _find_in(root: Path) -> Path | None:
    hits = sorted(root.glob("**/nvidia/*/bin/cuobjdump")) + sorted(root.glob("**/nvidia/cuda_cuobjdump/bin/cuobjdump"))
    return hits[0] if hits else None


def find_cuobjdump(install: bool = True) -> tuple[str, str]:
    """(path, where it came from). Installs the pinned wheel into a tool venv if needed."""
    env = os.environ.get("KTENV_CUOBJDUMP")
    if env:
        if not os.access(env, os.X_OK):
            raise AuditError(f"KTENV_CUOBJDUMP={env} is not an executable file. Unset it to let ktenv install "
                             f"{CUOBJDUMP_REQ} from PyPI, or point it at a cuobjdump binary.")
        return env, "$KTENV_CUOBJDUMP"
    import sys

    for entry in sys.path:  # installed as a ktenv dependency
        found = sorted(Path(entry).glob("nvidia/*/bin/cuobjdump")) if entry else []
        if found:
            return str(found[0]), f"ktenv's environment ({entry})"
    venv = cache_dir() / "tools" / CUOBJDUMP_REQ.replace("==", "-")
    hit = _find_in(venv)
    if hit:
        return str(hit), f"tool venv {venv}"
    if not install:
        raise AuditError(f"No cuobjdump: ktenv installs {CUOBJDUMP_REQ} into {venv} on first use.")
    uv = uv_bin()
    reqs = venv.parent / f"{venv.name}.txt"
    venv.parent.mkdir(parents=True, exist_ok=True)
    reqs.write_text(CUOBJDUMP_REQ + " " + " ".join(f"--hash={h}" for h in CUOBJDUMP_HASHES) + "\n")
    for cmd in ([uv, "venv", "--quiet", str(venv)],
                [uv, "pip", "install", "--quiet", "--require-hashes", "--python", str(venv / "bin" / "python"), "-r", str(reqs)]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise AuditError(f"Installing {CUOBJDUMP_REQ} (NVIDIA's fat-binary lister) into {venv} failed: "
                             f"{p.stderr.strip()[-600:]}. The audit needs it once; check that PyPI is reachable, or set "
                             "KTENV_CUOBJDUMP to an existing cuobjdump.")
    hit = _find_in(venv)
    if not hit:
        raise AuditError(f"{CUOBJDUMP_REQ} installed into {venv} but has no bin/cuobjdump; the wheel's layout changed. "
                         "Set KTENV_CUOBJDUMP to a cuobjdump binary.")
    return str(hit), f"tool venv {venv} (installed now)"


def tool_version(cuobjdump: str) -> str:
    out = subprocess.run([cuobjdump, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def parse_listing(text: str) -> dict:
    """cuobjdump -lelf / -lptx output -> {"sass": {code: count}, "ptx": {code: count}}."""
    out: dict = {"sass": {}, "ptx": {}}
    for kind, code, _ in CODE.findall(text):
        key = "sass" if kind == "ELF" else "ptx"
        out[key][code] = out[key].get(code, 0) + 1
    return out


def list_codes(cuobjdump: str, path: Path) -> dict:
    """SASS and PTX targets in one file. device_code False when it has none."""
    result: dict = {"sass": {}, "ptx": {}, "device_code": False}
    flags = ["-lelf"] if path.suffix == ".cubin" else ["-lelf", "-lptx"]
    for flag in flags:
        p = subprocess.run([cuobjdump, flag, str(path)], capture_output=True, text=True)
        text = p.stdout + p.stderr
        if "does not contain device code" in text:
            return result
        if p.returncode and "No PTX file found" not in text and "No ELF file found" not in text:
            result["error"] = " ".join(text.split())[-400:]
            return result
        part = parse_listing(text)
        for k in ("sass", "ptx"):
            result[k].update(part[k])
    result["device_code"] = bool(result["sass"] or result["ptx"])
    return result


class Cache:
    """sha256 -> listing, plus (device, inode, size, mtime) -> sha256 so unchanged files are not re-hashed."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        self.listings: dict = data.get("listings", {})
        self.hashes: dict = data.get("hashes", {})
        self.hits = self.misses = 0

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self.hashes:
            with open(path, "rb") as f:
                self.hashes[key] = hashlib.file_digest(f, "sha256").hexdigest()
        return self.hashes[key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"listings": self.listings, "hashes": self.hashes}))
        os.replace(tmp, self.path)


def scan(roots: list[Path], cuobjdump: str, cache: Cache, workers: int = WORKERS) -> tuple[list[dict], dict]:
    """Every binary under roots with its listing. Returns (entries, timings)."""
    t0 = time.monotonic()
    files, seen = [], set()
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath, n)
                if BINARY.search(n) and not p.is_symlink() and p.is_file():
                    real = p.resolve()
                    if real not in seen:
                        seen.add(real)
                        files.append(p)
    t1 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(cache.sha256, files))
    t2 = time.monotonic()
    todo = sorted({(d, f) for d, f in zip(digests, files) if d not in cache.listings}, key=lambda x: str(x[1]))
    todo = list({d: f for d, f in todo}.items())
    cache.hits, cache.misses = len(files) - len(todo), len(todo)

    def one(item):
        d, f = item
        cache.listings[d] = list_codes(cuobjdump, f)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, todo))
    t3 = time.monotonic()
    entries = [{"path": str(f), "bytes": f.stat().st_size, "sha256": d, **cache.listings[d]} for d, f in zip(digests, files)]
    return entries, {"files": len(files), "walk_s": round(t1 - t0, 1), "hash_s": round(t2 - t1, 1),
                     "cuobjdump_s": round(t3 - t2, 1), "listed": len(todo), "cached": len(files) - len(todo)}


# --- what loads on this arch ----------------------------------------------------------

# Libraries whose kernels every DeepSeek-V4 forward runs: torch's own CUDA
# kernels, cuBLAS(Lt) GEMMs, cuRAND (sampling), NCCL (tensor parallel).
LIBRARY_ROLES = (
    (r"torch/lib/lib(torch_cuda|c10_cuda)\.so", "torch's CUDA kernels, loaded with torch"),
    (r"nvidia/(cublas|curand|nccl|cuda_runtime)/lib/", "a CUDA library every forward calls (GEMM, sampling, NCCL)"),
)
# Libraries that keep their kernels outside any fatbin cuobjdump can list.
BLIND = (
    (r"nvidia/cufft/lib/", " (cuFFT keeps its FFT kernels in its own container: cuobjdump sees only a sm_52 stub, "
                           "so its coverage cannot be judged here)"),
)


@dataclass
class Role:
    kind: str  # "loaded", "on-demand", "not-loaded"
    why: str
    group: str = ""  # binaries reported together (12,000 flashinfer cubins are one line per directory)


def role(rel: str, arch: specmod.Arch) -> Role:
    """How the env's loaders treat the binary at `rel` (relative to site-packages) on `arch`."""
    m = re.search(r"(?:^|/)sgl_kernel/(sm\d+)/common_ops\.", rel)
    if m:
        pick = "sm90" if arch.compute_capability == "9.0" else "sm100"
        if m.group(1) == pick:
            return Role("loaded", f"sgl_kernel/load_utils.py loads {pick}/common_ops on compute capability "
                                  f"{arch.compute_capability} ({'9.0 only' if pick == 'sm90' else 'every capability but 9.0'})")
        return Role("not-loaded", f"load_utils.py takes {pick}/, not {m.group(1)}/, on {arch.compute_capability}")
    if re.search(r"(?:^|/)sgl_kernel/flash_ops\.", rel):
        return Role("on-demand", "FA3 (sgl_kernel.flash_attn), used by sglang's fa3 attention backend; "
                                 "DeepSeek-V4 runs its own compressed-attention backend")
    if re.search(r"(?:^|/)sgl_kernel/\w+_ops\.", rel):
        return Role("on-demand", "an optional sgl_kernel extension, imported by the backend that needs it")
    for pattern, why in LIBRARY_ROLES:
        if re.match(pattern, rel):
            return Role("loaded", why)
    if rel.startswith(("torch/lib/", "nvidia/")):
        note = next((n for p, n in BLIND if re.match(p, rel)), "")
        return Role("on-demand", "a CUDA library torch links; its kernels run only when torch calls into it" + note)
    m = re.match(r"flashinfer_cubin/cubins/[^/]+/([^/]+)/", rel)
    if m:
        group = "flashinfer_cubin/" + re.sub(r"-[0-9a-f]{7}(-[0-9a-f]{7})?$", "", m.group(1))
        if "batched_gemm" in m.group(1) and arch.paths.get("mxfp4_moe") == "trtllm_fp4":
            return Role("loaded", "TRT-LLM MoE cubins: the trtllm_fp4 MXFP4 MoE path loads them", group)
        return Role("on-demand", "loaded by flashinfer only for the TRT-LLM kernel that needs it", group)
    return Role("on-demand", "not on the DeepSeek-V4 serving path as far as ktenv knows")


# --- the audit ---------------------------------------------------------------------

def probe_env(python: Path, env: dict | None = None) -> dict:
    p = subprocess.run([str(python), str(PROBE)], capture_output=True, text=True, timeout=120,
                       env={**(env or os.environ), "PYTHONDONTWRITEBYTECODE": "1"}, cwd=tempfile.gettempdir())
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise AuditError(f"{python} could not run the audit probe (exit {p.returncode}): {p.stderr.strip()[-600:]}")


def _cc(arch: specmod.Arch) -> tuple[int, int]:
    major, minor = arch.compute_capability.split(".")
    return int(major), int(minor)


def _codes(d: dict) -> str:
    parts = [f"{c}" + (f"x{n}" if n > 1 else "") for c, n in sorted(d.items(), key=lambda kv: parse_code(kv[0]))]
    return " ".join(parts) or "-"


def audit(arch: specmod.Arch, python: Path, cuobjdump: str | None = None, how: str = "", cache_path: Path | None = None,
          extra_roots: list[Path] | None = None, workers: int = WORKERS) -> dict:
    t0 = time.monotonic()
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
    cc = _cc(arch)
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
        r = role(rel, arch)
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
    pick = "sm90" if arch.compute_capability == "9.0" else "sm100"
    if (site / "sgl_kernel").is_dir() and not any(
            b["role"] == "loaded" and re.search(r"sgl_kernel/sm\d+/common_ops\.", b["binary"]) for b in binaries):
        failures.append({"binary": f"sgl_kernel/{pick}/common_ops.abi3.so",
                         "why": f"sgl_kernel loads {pick}/common_ops on compute capability {arch.compute_capability}, and it is "
                                "not on disk (for sm100/ it comes from the split payload, which this env has not extracted), "
                                "so it could not be audited; `python build.py env` places it"})
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
            jit.append({"compiler": what, "ok": None, "evidence": j.get("error", "not in this env")})
            continue
        target = f"sm_{arch.sm_number}"
        ok = target in j["archs"]
        jit.append({"compiler": what, "ok": ok, "version": j["version"],
                    "evidence": f"{j['version']} targets {target}" if ok else f"{j['version']} cannot target {target} "
                    f"(knows {', '.join(j['archs'][-6:])})"})
        if not ok:
            failures.append({"binary": j.get("path") or j.get("library"),
                             "why": f"{what} {j['version']} cannot compile for {target}"})
    return {"arch": arch.name, "compute_capability": arch.compute_capability, "site": str(site), "roots": [str(r) for r in roots],
            "cuobjdump": {"path": cuobjdump, "version": version, "from": how}, "cache": str(cache.path),
            "timing": {**timing, "total_s": round(time.monotonic() - t0, 1)}, "ok": not failures, "failures": failures,
            "binaries": sorted(binaries, key=lambda b: (b["role"] != "loaded", b["binary"])),
            "groups": sorted(groups.values(), key=lambda g: g["group"]), "jit": jit,
            "without_device_code": len(no_device),
            "sgl_kernel_loader": ("sm90/common_ops (cc 9.0)" if arch.compute_capability == "9.0" else
                                  f"sm100/common_ops from the payload (load_utils.py: every cc but 9.0; here {arch.compute_capability})")}


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


def run(args) -> int:
    spec = specmod.load(getattr(args, "envs", "envs"))
    arch = spec.arch(args.arch)
    python = launch.env_python(arch.name, getattr(args, "prefix", None))
    if not python.exists():
        raise KtenvError(f"There is no environment for {arch.name} at {python.parent.parent} (no {python}). "
                         f"Build it first: python build.py env --arch {arch.name}.")
    report = audit(arch, python)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0 if report["ok"] else 1
