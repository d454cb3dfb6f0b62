"""`python build.py smoke`: prove an environment, tier by tier.

    import      every locked distribution at its locked version, every module
                it installs imports, and the pieces the arch's path needs
                (torch's CUDA, sglang's server args, kt-kernel, flashinfer +
                cubin, tilelang + tvm-ffi, transformers + the DeepSeek-V4
                config, the sgl-kernel payload)
    kernel      a KT-Kernel MXFP4 MoE forward against a torch reference
    launch-cpu  the arch's launch command through sglang's own argparse, and
                the DeepSeek-V4 env-var rules
    launch-gpu  a real server on a generated tiny DeepSeek-V4 model (dummy
                weights) when a GPU of the arch is visible; skipped otherwise

Every check runs in the env's python, in its own process (ktenv never imports
torch or sglang). A result is passed, failed, needs-gpu (it could only fail
for want of the NVIDIA driver, and says so) or skipped (with the reason);
never passed for something that did not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from . import doctor, hostinfo, ktkernel, launch, lockfile, payload
from . import gpu as gpumod
from . import rules
from . import spec as specmod
from .audit import runs_on
from .errors import KtenvError

TIERS = ("import", "kernel", "launch-cpu", "launch-gpu")
PASSED, FAILED, NEEDS_GPU, SKIPPED = "passed", "failed", "needs-gpu", "skipped"
PROBES = Path(__file__).parent / "probes"
MARK = "KTENV-RESULT "
# The machine ktenv is developed and tested on has 2 cores; imports are
# CPU-bound, so more processes only thrash.
IMPORT_WORKERS = 2
IMPORT_TIMEOUT = 600

# Modules that fail to import in a correct env for reasons outside the stack's
# serving path. Each says why; anything else that fails is a failure.
IMPORT_EXEMPT = {
    "matplotlib_inline": "IPython's inline plotting backend needs matplotlib, which nothing in the stack "
                         "requires (ipython brings matplotlib-inline without it); serving never imports it",
    "torchcodec": "video decoding for multimodal inputs; it loads the system's FFmpeg 4-8 libraries "
                  "(apt-get install ffmpeg); DeepSeek-V4 text serving never imports it",
}

# What sglang-kt 0.7.2 imports for each [arch.paths] choice (read from its
# sources: layers/quantization/mxfp4_deepseek.py, layers/attention/
# flash_mla_sm120.py and compressed/metadata.py). `required`: sglang refuses
# to run the path without it; otherwise it falls back, and the result says to what.
PATH_NEEDS = {
    ("mxfp4_moe", "trtllm_fp4"): {
        "required": True, "min_flashinfer": "0.6.9",
        "symbols": ["flashinfer:mxfp8_quantize", "flashinfer:shuffle_matrix_a", "flashinfer:shuffle_matrix_sf_a",
                    "flashinfer.fp4_quantization:block_scale_interleave",
                    "flashinfer.fused_moe:trtllm_fp4_block_scale_routed_moe",
                    "flashinfer.fused_moe.core:_maybe_get_cached_w3_w1_permute_indices",
                    "flashinfer.fused_moe.core:get_w2_permute_indices_with_cache"]},
    ("mxfp4_moe", "triton_kernels"): {
        "required": True, "symbols": ["triton_kernels.matmul_ogs:matmul_ogs",
                                      "triton_kernels.numerics_details.mxfp:downcast_to_mxfp"]},
    ("sparse_mla", "flashinfer_sm120"): {
        "required": False, "fallback": "sglang's Triton sparse-MLA decode",
        "symbols": ["flashinfer.mla._sparse_mla_sm120:_sparse_mla_sm120_paged_attention",
                    "flashinfer.mla._sparse_mla_sm120:_DECODE_MAX_TOKENS"]},
    # Hopper: deepseek_v4_backend_radix.py imports flash_mla for every batch's
    # metadata and debug_flash_mla_adapter.py decodes through it on (9, 0); no fallback.
    ("sparse_mla", "flash_mla"): {
        "required": True,
        "symbols": ["flash_mla:get_mla_metadata", "flash_mla:flash_mla_with_kvcache",
                    "flash_mla.flash_mla_interface:FlashMLASchedMeta"],
        "remedy": ("sglang-kt imports flash_mla on compute capability 9.0 for every prefill, decode and CUDA-graph "
                   "capture and has no fallback there, so this env cannot serve DeepSeek-V4 on Hopper. No usable "
                   "wheel is on PyPI: build it into the env with `build.py env --arch sm90 --flash-mla-source PATH` "
                   "(a FlashMLA checkout at the commit envs/sm90.toml [flash_mla] names).")},
}


@dataclass
class Result:
    tier: str
    name: str
    status: str
    evidence: str
    remedy: str = ""
    detail: dict = field(default_factory=dict)


@dataclass
class Context:
    spec: specmod.Spec
    arch: specmod.Arch
    prefix: Path
    python: Path
    lock: lockfile.Lock | None
    requirements: list[dict]
    env: dict  # the environment every probe runs with
    cpu_flags: frozenset = frozenset()
    workers: int = IMPORT_WORKERS
    modules: list[str] | None = None  # restrict the import sweep (tests); None = all
    extra_args: list[str] = field(default_factory=list)  # extra server flags (launch tiers)
    work: Path | None = None  # where launch-gpu keeps its model and log


# --- plumbing -----------------------------------------------------------------

def locked_requirements(path: Path) -> list[dict]:
    """name, version and marker of each `name==version [; marker]` line of a hashed lock."""
    text = re.sub(r"\\\n\s*", " ", Path(path).read_text())
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s--hash=\S+", "", line.split(" #", 1)[0]).strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if len(pins) != 1:
            raise KtenvError(f"{path}: {line!r} is not pinned to one version (name==version); "
                             "a lock must pin every package. Regenerate it with `python build.py lock`.")
        out.append({"name": req.name, "version": pins[0], "marker": str(req.marker) if req.marker else ""})
    return out


def child_env(spec: specmod.Spec, arch: str, base: dict | None = None) -> dict:
    """os.environ plus the stack's and arch's [env] (what a launch sets), bytecode off
    so that probing an env never writes into it."""
    env = dict(os.environ if base is None else base)
    for k, v in rules.inputs(spec, arch).env.items():
        env.setdefault(k, v)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)  # ktenv's own path must not leak into the env's python
    return env


def probe(ctx: Context, script: str, args: list[str], stdin: dict | None = None,
          timeout: float = IMPORT_TIMEOUT, env: dict | None = None) -> tuple[dict | None, str]:
    """Run probes/<script> with the env's python. (its KTENV-RESULT json or None, why not)."""
    cmd = [str(ctx.python), str(PROBES / script), *args]
    try:
        p = subprocess.run(cmd, input=json.dumps(stdin or {}), capture_output=True, text=True,
                           timeout=timeout, env=env or ctx.env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {timeout:.0f} s"
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):]), ""
    if p.returncode < 0:
        name = signal.Signals(-p.returncode).name
        return None, f"the process was killed by {name}; stderr ends: {_tail(p.stderr)}"
    return None, f"exit status {p.returncode} without a report; stderr ends: {_tail(p.stderr)}"


def _tail(text: str, n: int = 600) -> str:
    text = " ".join(text.strip().split())
    return ("..." + text[-n:]) if len(text) > n else text


def _v(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


# --- import tier -------------------------------------------------------------------

def _import_result(name: str, r: dict | None, why: str) -> Result:
    if r is None:
        return Result("import", f"import {name}", FAILED, f"`import {name}` {why}",
                      "Run the import by hand in the env to see the whole error; a signal means a native "
                      "library aborted the interpreter (see FACTS: tvm-ffi 0.1.12).")
    if r.get("ok"):
        note = f" (only after `import {', '.join(r['after'])}`)" if r.get("after") else ""
        return Result("import", f"import {name}", PASSED, f"imported in {r['seconds']} s{note}")
    if name in IMPORT_EXEMPT:
        return Result("import", f"import {name}", SKIPPED, f"not needed: {IMPORT_EXEMPT[name]}. It fails with: {r['error'][:300]}")
    if r.get("needs_gpu"):
        after = (f"it finds the CUDA runtime only once `import {', '.join(r['after'])}` has loaded it; then it "
                 if r.get("after") else "")
        return Result("import", f"import {name}", NEEDS_GPU,
                      f"{after}fails only for want of the NVIDIA driver: {r['error'][:400]}",
                      "Run smoke on a machine with the arch's GPU and driver to import it for real.")
    return Result("import", f"import {name}", FAILED, r["error"][:800],
                  "The module is installed but does not import; the traceback tail is in the JSON report. "
                  "Rebuild the env from its lock (`python build.py env --arch ...`).", {"traceback": r.get("traceback_tail", "")})


def _import_one(ctx: Context, name: str) -> Result:
    r, why = probe(ctx, "smoke_import.py", ["import", name])
    if r and not r["ok"] and not r.get("needs_gpu") and re.search(r"lib\S+\.so\S*: cannot open shared object", r["error"]):
        # Some extensions (mscclpp) find the CUDA runtime only because torch,
        # imported first in real use, has loaded it from the nvidia-* wheels.
        r2, _ = probe(ctx, "smoke_import.py", ["import", name, "--after", "torch"])
        if r2 and (r2.get("ok") or r2.get("needs_gpu")):
            r2["after"] = ["torch"]
            r = r2
    return _import_result(name, r, why)


def _versions(ctx: Context, inv: dict) -> Result:
    problems = [f"missing: {m}" for m in inv["missing"]] + inv["wrong_version"]
    damaged = [f"{d}: {v['count']} file(s) absent or resized, e.g. {', '.join(v['examples'][:3])}"
               for d, v in inv["damaged"].items()]
    evidence = (f"{inv['checked']} locked distributions installed at their locked versions"
                + (f"; {len(inv['not_for_this_python'])} not for Python {inv['python']} (markers)" if inv["not_for_this_python"] else "")
                + (f"; not in the lock: {', '.join(inv['extra'][:10])}" if inv["extra"] else ""))
    detail = {k: inv[k] for k in ("wrong_version", "missing", "not_for_this_python", "extra", "damaged", "overlapping")}
    if problems or damaged:
        return Result("import", "locked versions", FAILED, "; ".join(problems + damaged)[:1500],
                      f"The env no longer matches lock/{ctx.arch.name}/requirements.txt. Rebuild it: "
                      f"python build.py env --arch {ctx.arch.name}" + (f" --prefix {ctx.prefix}" if ctx.prefix else ""), detail)
    return Result("import", "locked versions", PASSED, evidence, detail=detail)


def _check(ctx: Context, name: str, arg: dict | None = None) -> tuple[dict | None, Result | None]:
    """Run a named check; a Result when it could not report or failed for want of a GPU."""
    r, why = probe(ctx, "smoke_import.py", ["check", name], arg)
    if r is None:
        return None, Result("import", name, FAILED, f"the {name} check {why}",
                            "Run the import by hand in the env; a signal means a native library aborted.")
    if not r["ok"]:
        status = NEEDS_GPU if r.get("needs_gpu") else FAILED
        return r, Result("import", name, status, r["error"][:800],
                         "Run on a machine with the arch's GPU." if status == NEEDS_GPU else "", {"traceback": r.get("traceback_tail", "")})
    return r, None


def _torch(ctx: Context) -> Result:
    r, bad = _check(ctx, "torch")
    if bad:
        return bad
    want_cuda = ctx.lock.cuda if ctx.lock and ctx.lock.cuda else ctx.spec.stack.cuda
    want_tag = ctx.lock.torch_cuda if ctx.lock and ctx.lock.torch_cuda else ctx.spec.stack.torch_cuda
    local = r["version"].partition("+")[2]
    ev = f"torch {r['version']}, CUDA {r['cuda']}, kernels for {' '.join(r['arch_list']) or 'no GPU arch'}"
    if r["cuda"] != want_cuda or (want_tag and local != want_tag):
        return Result("import", "torch", FAILED, ev + f"; the stack needs CUDA {want_cuda} ({want_tag})",
                      "This torch is another CUDA build than the lock's (a CPU-only or cu13 wheel slipped in). "
                      "Rebuild the env from its lock.")
    # SASS for X.Y runs on X.Z with Z >= Y (sm_86 kernels serve an sm89 card).
    cc = tuple(int(x) for x in ctx.arch.compute_capability.split("."))
    runs = [a for a in r["arch_list"] if re.fullmatch(r"sm_\d+[af]?", a) and runs_on(a, cc, "sass")]
    sm = f"sm_{ctx.arch.sm_number}"
    if r["arch_list"] and not runs:
        return Result("import", "torch", FAILED, ev + f"; none for {sm}",
                      f"This torch build has no kernels for {ctx.arch.title}; `build.py audit` shows the binaries.")
    return Result("import", "torch", PASSED, ev + (f"; {' '.join(runs)} run on {ctx.arch.compute_capability}" if runs else ""))


def _server_args(ctx: Context) -> Result:
    r, bad = _check(ctx, "server_args")
    if bad:
        bad.name = "sglang server args"
        return bad
    if not r["has_kt_method"]:
        return Result("import", "sglang server args", FAILED, f"{r['flags']} flags, but no --kt-method",
                      "This sglang is upstream's, not sglang-kt: the KT CPU-expert flags are missing.")
    return Result("import", "sglang server args", PASSED, f"ServerArgs.add_cli_args: {r['flags']} flags incl. --kt-method, --kt-weight-path ({r['seconds']} s)")


def _kt_kernel(ctx: Context) -> Result:
    try:
        rep = ktkernel.verify_prebuilt(str(ctx.python), ctx.cpu_flags or None, environ=ctx.env)
    except KtenvError as e:
        return Result("import", "kt_kernel", FAILED, str(e).split(". ")[0] + ".", str(e))
    return Result("import", "kt_kernel", PASSED,
                  f"kt-kernel {rep.get('kt_kernel_version')} loads its {rep['variant']} build (the best this CPU runs: "
                  f"{rep['best']}); CPUInfer.submit_with_cuda_stream present (built with CUDA)", detail=rep)


def _flashinfer(ctx: Context) -> list[Result]:
    needs = [(k, PATH_NEEDS[(k, v)]) for k, v in ctx.arch.paths.items() if (k, v) in PATH_NEEDS]
    symbols = sorted({s for _, n in needs for s in n["symbols"]})
    r, bad = _check(ctx, "flashinfer", {"symbols": symbols})
    if bad:
        return [bad]
    out = []
    py, cub, mod = r["python_dist"], r["cubin_dist"], r["cubin_module"]
    locked = ctx.lock.lockstep if ctx.lock else {}
    ev = f"flashinfer-python {py}, flashinfer-cubin {cub}" + (f" (module says {mod})" if mod else "")
    if r.get("import_error"):
        ev += f"; `import flashinfer` fails: {r['import_error']}"
    if not cub or _v(py) != _v(cub) or (mod and _v(mod) != _v(cub)):
        out.append(Result("import", "flashinfer + cubin", FAILED, ev,
                          "flashinfer-python and flashinfer-cubin must be the same release; the cubins are built for "
                          "one flashinfer version. Rebuild the env from its lock (the flashinfer-lockstep rule pins both)."))
    elif locked.get("flashinfer-python") and _v(locked["flashinfer-python"]) != _v(py):
        out.append(Result("import", "flashinfer + cubin", FAILED, ev + f"; the lock says {locked['flashinfer-python']}",
                          "Rebuild the env from its lock."))
    elif r.get("import_error"):
        out.append(Result("import", "flashinfer + cubin", NEEDS_GPU if r.get("needs_gpu") else FAILED, ev,
                          "See the error; flashinfer must import for every DeepSeek-V4 path."))
        return out
    else:
        out.append(Result("import", "flashinfer + cubin", PASSED, ev + f", {r.get('cubin_count')} cubins"))
    if r.get("import_error"):
        return out  # the path symbols cannot be looked up without flashinfer
    for key, need in needs:
        path = ctx.arch.paths[key]
        missing = {s: why for s, why in r["symbols"].items() if s in need["symbols"] and why != "ok"}
        name = f"path {key}={path}"
        low = need.get("min_flashinfer") and _v(py) and _v(py) < _v(need["min_flashinfer"])
        if not missing and not low:
            out.append(Result("import", name, PASSED, f"{len(need['symbols'])} symbols sglang-kt imports for it are present"))
        elif need["required"]:
            why = "; ".join(f"{s}: {w}" for s, w in missing.items())
            if low:
                why = f"flashinfer {py} < {need['min_flashinfer']}, which sglang-kt refuses for this path; " + why
            out.append(Result("import", name, FAILED, why[:1200], need.get("remedy") or (
                              f"{ctx.arch.name}'s {key} runs through {path}; without these the model cannot load. "
                              "Rebuild the env from a lock made with envs/ as it is (see `build.py explain`).")))
        else:
            out.append(Result("import", name, PASSED,
                              f"not available here ({next(iter(missing.values()))[:200]}); sglang-kt falls back to "
                              f"{need['fallback']}, which is what runs on {ctx.arch.name} with this env"))
    return out


def _tilelang(ctx: Context) -> Result:
    r, bad = _check(ctx, "tilelang")
    if bad:
        bad.name = "tilelang + tvm-ffi"
        if "SIGABRT" in bad.evidence or "__ffi_repr__" in bad.evidence:
            bad.remedy = ("tilelang aborted the interpreter; with apache-tvm-ffi 0.1.12 this is the known "
                          "`__ffi_repr__ already registered` abort (kvcache-ai/ktransformers#2045). Keep apache-tvm-ffi < 0.1.12.")
        elif "No module named 'tilelang'" in bad.evidence:
            bad.remedy = ("sglang-kt's DeepSeek-V4 attention and indexer import tilelang at module top on every arch; "
                          "without it the model never registers (\"DeepseekV4ForCausalLM not registered\", "
                          "kvcache-ai/ktransformers#1977). Rebuild the env from its lock (rule tilelang-everywhere).")
        return bad
    return Result("import", "tilelang + tvm-ffi", PASSED,
                  f"tilelang {r['tilelang']} imports with apache-tvm-ffi {r['tvm_ffi_dist']} ({r['seconds']} s)")


def _transformers(ctx: Context) -> Result:
    r, bad = _check(ctx, "transformers")
    if bad:
        bad.name = "transformers + DeepSeek-V4 config"
        if "non-default argument" in bad.evidence:
            bad.remedy = ("A dataclass DeepSeek-V4 config met transformers 5.x (kvcache-ai/ktransformers#1974): this "
                          "sglang-kt needs transformers 4.57.1 (rule transformers-dataclass-config).")
        return bad
    providers = r["providers"]
    ev = (f"`transformers` {r['transformers_version']} comes from {', '.join(providers)}; "
          f"{r['config_class']} instantiates and round-trips to JSON")
    if len(providers) != 1:
        return Result("import", "transformers + DeepSeek-V4 config", FAILED, ev,
                      "Two distributions install the same transformers/ files; the last one installed wins, and "
                      "it may not be the one sglang-kt was built against. Rebuild the env from its lock.")
    if not r["round_trip"]:
        return Result("import", "transformers + DeepSeek-V4 config", FAILED, ev + ", but the JSON lost fields",
                      "The config class and transformers disagree; see `build.py explain` for the transformers rule.")
    return Result("import", "transformers + DeepSeek-V4 config", PASSED, ev)


def _payload(ctx: Context, site: Path) -> Result:
    name = "sgl-kernel payload"
    try:
        manifest = payload.read_manifest(site)
        if manifest is None:
            return Result("import", name, PASSED, "this stack ships sgl_kernel without a split payload")
        parts = payload.carriers(site, manifest)
        payload._verify_parts([p["path"] for p in parts], manifest)
        where = payload.verify_in_env(ctx.python, site)
    except KtenvError as e:
        return Result("import", name, FAILED, str(e)[:600],
                      f"Rebuild the env: python build.py env --arch {ctx.arch.name} (it joins, checks and places the payload).")
    # sgl_kernel/load_utils.py: compute capability 9.0 loads sm90/, every other one sm100/.
    sub = "sm90" if ctx.arch.compute_capability == "9.0" else "sm100"
    in_wheel = list((site / "sgl_kernel" / sub).glob("common_ops.*"))
    if not in_wheel and f"{sub}/common_ops.abi3.so" not in manifest.binaries:
        return Result("import", name, FAILED, f"sgl_kernel/{sub}/common_ops.* is neither installed nor in the payload",
                      f"sgl_kernel's loader picks {sub}/ on {ctx.arch.name}; the wheel carrying it is missing "
                      "(ktransformers carries sm90/). Rebuild the env from its lock.")
    src = f"sgl_kernel/{sub}/ in the wheel" if in_wheel else f"{sub}/common_ops from the payload"
    return Result("import", name, PASSED,
                  f"{len(parts)} parts join to the manifest's sha256; the loader finds the files at {where.get('root')}; "
                  f"on {ctx.arch.name} it loads {src}", detail={"root": where.get("root")})


def import_tier(ctx: Context) -> list[Result]:
    inv, why = probe(ctx, "smoke_import.py", ["inventory"], {"requirements": ctx.requirements})
    if inv is None:
        return [Result("import", "inventory", FAILED, f"listing the env's distributions {why}",
                       f"{ctx.python} cannot even read its own metadata; rebuild the env.")]
    results = [_versions(ctx, inv)]
    mods = sorted({m for ms in inv["modules"].values() for m in ms})
    if ctx.modules is not None:
        mods = [m for m in mods if m in ctx.modules]
    t = time.monotonic()
    with ThreadPoolExecutor(ctx.workers) as pool:
        per_module = list(pool.map(lambda m: _import_one(ctx, m), mods))
    counts = {s: sum(1 for r in per_module if r.status == s) for s in (PASSED, FAILED, NEEDS_GPU, SKIPPED)}
    sweep = Result("import", "module imports", FAILED if counts[FAILED] else PASSED,
                   f"{len(mods)} modules of {len(inv['modules'])} distributions, {ctx.workers} at a time, in "
                   f"{time.monotonic() - t:.0f} s: {counts[PASSED]} imported, {counts[NEEDS_GPU]} need the GPU driver, "
                   f"{counts[SKIPPED]} not needed, {counts[FAILED]} failed",
                   detail={"modules": {r.name[7:]: {"status": r.status, "evidence": r.evidence} for r in per_module}})
    results.append(sweep)
    results += [r for r in per_module if r.status != PASSED]
    results.append(_torch(ctx))
    results.append(_server_args(ctx))
    results.append(_kt_kernel(ctx))
    results += _flashinfer(ctx)
    results.append(_tilelang(ctx))
    results.append(_transformers(ctx))
    results.append(_payload(ctx, Path(inv["site_packages"])))
    return results


# --- kernel tier -----------------------------------------------------------------

KT_MOE = PROBES / "kt_moe.py"


def kernel_tier(ctx: Context) -> list[Result]:
    name = "KT-Kernel MXFP4 MoE vs torch"
    try:
        p = subprocess.run([str(ctx.python), str(KT_MOE)], capture_output=True, text=True, timeout=900,
                           env=ctx.env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return [Result("kernel", name, FAILED, "did not finish in 900 s", "Run probes/kt_moe.py by hand in the env.")]
    try:
        rep = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sig = f" (killed by {signal.Signals(-p.returncode).name})" if p.returncode < 0 else ""
        return [Result("kernel", name, FAILED, f"no report, exit {p.returncode}{sig}; stderr ends: {_tail(p.stderr)}",
                       "SIGILL means the loaded kt-kernel build uses instructions this CPU lacks (#1713).")]
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


# --- launch tiers ----------------------------------------------------------------

def _command(ctx: Context, model: str, speculative: bool = True, extra: list[str] | None = None,
             facts: doctor.HostFacts | None = None, require_gpu: bool = False) -> tuple[launch.LaunchCommand, str]:
    """The command `build.py launch` would run, and the DeepSeek-V4 env-var problem
    (as launch words it) if there is one. launch refuses such a command outright;
    smoke reports the problem and still parses the flags (with a valid mode)."""
    user = {k: v for k, v in ctx.env.items() if k.startswith("SGLANG_DSV4")}
    kw = dict(model=model, python=str(ctx.python), speculative=speculative,
              extra=list(ctx.extra_args) + list(extra or []), numactl=shutil.which("numactl") or "numactl",
              require_gpu=require_gpu)
    facts = facts or doctor.live_facts(str(ctx.prefix))
    try:
        return launch.build_command(ctx.spec, ctx.arch.name, facts, user_env=user, **kw), ""
    except launch.LaunchError as e:
        if "SGLANG_DSV4" not in str(e):
            raise
        valid = {"SGLANG_DSV4_MODE": "2601", "SGLANG_DSV4_2604_SUBMODE": ""}
        return launch.build_command(ctx.spec, ctx.arch.name, facts, user_env=valid, **kw), str(e)


def _dsv4(tier: str, cmd: launch.LaunchCommand, error: str) -> Result:
    if error:
        return Result(tier, "DeepSeek-V4 env vars", FAILED, error,
                      "sglang-kt checks these only while loading weights, minutes into a start; fix them first.")
    return Result(tier, "DeepSeek-V4 env vars", PASSED,
                  ", ".join(f"{k}={v}" for k, v in cmd.env.items() if k.startswith("SGLANG_DSV4")) + " with --kt-method "
                  + str(launch._flag_value(cmd.server_args, "--kt-method")))


def launch_cpu_tier(ctx: Context) -> list[Result]:
    model = str(Path(tempfile.gettempdir()) / "ktenv-smoke-model-not-loaded")
    cmd, dsv4_error = _command(ctx, model)
    results = [_dsv4("launch-cpu", cmd, dsv4_error)]
    r, why = probe(ctx, "smoke_launch_cpu.py", [], {"argv": cmd.server_args}, env={**ctx.env, **cmd.env})
    name = "launch command parses"
    if r is None or "import_error" in (r or {}):
        results.append(Result("launch-cpu", name, FAILED, why or r["import_error"],
                              "sglang's server arguments do not even import; see the import tier."))
        return results
    if not r["ok"]:
        flags = r.get("unknown") or ([r["bad_argument"]["flag"]] if r.get("bad_argument") else [])
        results.append(Result("launch-cpu", name, FAILED,
                              f"sglang {'does not know ' + ', '.join(flags) if r.get('unknown') else 'rejects ' + ', '.join(flags)}: {r['error']}",
                              "The installed sglang-kt does not accept this command. Remove or rename the flag in envs/ "
                              f"([launch.args] of stack.toml or {ctx.arch.name}.toml), or lock a stack whose sglang-kt knows it.",
                              {"argv": cmd.server_args}))
        return results
    spec_flags = [f for f in r["given_flags"] if f.startswith("--speculative")]
    results.append(Result("launch-cpu", name, PASSED,
                          f"sglang's own parser accepts all {len(r['given_flags'])} flags "
                          f"({len(spec_flags)} speculative) of `build.py launch --arch {ctx.arch.name}`",
                          detail={"argv": cmd.server_args, "parsed": r["parsed"]}))
    sa = r.get("server_args", {})
    if sa.get("ok"):
        results.append(Result("launch-cpu", "ServerArgs validation", PASSED, "ServerArgs.from_cli_args accepts the command"))
    elif sa.get("needs_gpu"):
        results.append(Result("launch-cpu", "ServerArgs validation", NEEDS_GPU, sa["error"],
                              "ServerArgs' post-init asks the accelerator first; run smoke --tier launch-gpu on the GPU host."))
    else:
        results.append(Result("launch-cpu", "ServerArgs validation", FAILED, sa.get("error", "")[:800],
                              "sglang's own validation rejects the command; the error names the setting.",
                              {"traceback": sa.get("traceback_tail", "")}))
    return results


def launch_gpu_tier(ctx: Context) -> list[Result]:
    from .probes import smoke_server

    host = gpumod.detect()
    visible = gpumod.visible_gpus(host.gpus, dict(ctx.env))
    mine = [g for g in visible.gpus if (a := gpumod.arch_for_cc(ctx.spec, g.compute_capability)) and a.name == ctx.arch.name]
    if not mine:
        seen = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in visible.gpus) or "no GPU"
        why = " ".join(host.notes) if not host.gpus else f"this host shows {seen}"
        return [Result("launch-gpu", "server on a tiny DeepSeek-V4", SKIPPED,
                       f"needs a visible {ctx.arch.title} GPU (compute capability {ctx.arch.compute_capability}); {why}",
                       f"Run `python build.py smoke --arch {ctx.arch.name} --tier launch-gpu` on such a host.")]
    work = ctx.work or Path(tempfile.mkdtemp(prefix=f"ktenv-smoke-{ctx.arch.name}-"))
    model = work / "model"
    r, why = probe(ctx, "smoke_tiny_model.py", [str(model)], timeout=900)
    if r is None or not r.get("ok"):
        return [Result("launch-gpu", "tiny model", FAILED, why or r.get("error", ""),
                       "The generator runs in the env (safetensors, tokenizers, sglang's config class); see the error.")]
    port = smoke_server.free_port()
    cmd, dsv4_error = _command(ctx, str(model), speculative=False, require_gpu=True,
                   extra=["--load-format", "dummy", "--port", str(port), "--kt-num-gpu-experts", str(r["gpu_experts"]),
                          "--kt-gpu-prefill-token-threshold", "0", "--context-length", "4096",
                          "--max-total-tokens", "4096", "--cuda-graph-max-bs", "1", "--cuda-graph-bs", "1"])
    results = [Result("launch-gpu", "tiny model", PASSED, f"{model}: {r['summary']}", detail=r),
               _dsv4("launch-gpu", cmd, dsv4_error)]
    if dsv4_error:
        return results
    run = smoke_server.ServerRun(cmd.argv, {**ctx.env, **cmd.env}, port, work / "server.log")
    report = run.check(deadline=float(os.environ.get("KTENV_SMOKE_START_TIMEOUT", "900")), prompt=r["prompt"])
    status = PASSED if report["ok"] else FAILED
    results.append(Result("launch-gpu", "server on a tiny DeepSeek-V4", status, report["summary"],
                          "" if report["ok"] else f"The server log is {work / 'server.log'}; its last lines are in the JSON report.",
                          report))
    return results


# --- driver ------------------------------------------------------------------------

TIER_FUNCS = {"import": import_tier, "kernel": kernel_tier, "launch-cpu": launch_cpu_tier, "launch-gpu": launch_gpu_tier}


def context(args, spec: specmod.Spec | None = None) -> Context:
    spec = spec or specmod.load(getattr(args, "envs", "envs"))
    arch = spec.arch(args.arch)
    python = launch.env_python(arch.name, getattr(args, "prefix", None))
    if not python.exists():
        raise KtenvError(f"There is no environment for {arch.name} at {python.parent.parent} (no {python}). "
                         f"Build it first: python build.py env --arch {arch.name}"
                         + (f" --prefix {args.prefix}" if getattr(args, "prefix", None) else "") + ".")
    lock_dir = lockfile.lock_dir(Path(getattr(args, "lock_dir", "lock")), arch.name, spec.stack.default, spec.stack.default)
    lock = lockfile.read(lock_dir)
    return Context(spec=spec, arch=arch, prefix=python.parent.parent, python=python, lock=lock,
                   requirements=locked_requirements(lock.requirements), env=child_env(spec, arch.name),
                   cpu_flags=hostinfo.cpu_info().flags)


def smoke(ctx: Context, tiers: list[str] | tuple[str, ...] = TIERS) -> dict:
    t = time.monotonic()
    results: list[Result] = []
    timings = {}
    for tier in TIERS:
        if tier not in tiers:
            continue
        t1 = time.monotonic()
        results += TIER_FUNCS[tier](ctx)
        timings[tier] = round(time.monotonic() - t1, 1)
    failed = [r for r in results if r.status == FAILED]
    return {"arch": ctx.arch.name, "prefix": str(ctx.prefix), "python": str(ctx.python), "tiers": list(timings),
            "seconds": timings, "total_seconds": round(time.monotonic() - t, 1), "ok": not failed,
            "counts": {s: sum(1 for r in results if r.status == s) for s in (PASSED, FAILED, NEEDS_GPU, SKIPPED)},
            "results": [asdict(r) for r in results]}


def render(report: dict) -> str:
    mark = {PASSED: "ok  ", FAILED: "FAIL", NEEDS_GPU: "gpu ", SKIPPED: "skip"}
    lines = [f"smoke {report['arch']} ({report['prefix']}): tiers {', '.join(report['tiers'])}"]
    tier = None
    for r in report["results"]:
        if r["tier"] != tier:
            tier = r["tier"]
            lines.append(f"\n[{tier}] {report['seconds'][tier]} s")
        ev = " ".join(r["evidence"].split())  # library messages come with their own line breaks
        ev = ev if len(ev) <= 400 else ev[:400] + " ... (--json has it whole)"
        lines.append(f"  {mark[r['status']]} {r['name']}: {ev}")
        if r["remedy"] and r["status"] in (FAILED, NEEDS_GPU):
            lines.append(f"       -> {r['remedy']}")
    c = report["counts"]
    lines.append(f"\n{c[PASSED]} passed, {c[FAILED]} failed, {c[NEEDS_GPU]} need a GPU, {c[SKIPPED]} skipped "
                 f"in {report['total_seconds']} s")
    return "\n".join(lines)


def run(args) -> int:
    ctx = context(args)
    report = smoke(ctx, args.tier or TIERS)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0 if report["ok"] else 1
