"""The import tier: every locked distribution at its locked version, every module
it installs imports (each in its own process, forked from the smoke's fork
server, so one abort fails one module), what the arch's dispatch paths need
(envs/loaders.toml): torch's CUDA, sglang's server args, kt-kernel,
flashinfer + cubin, tilelang + tvm-ffi, transformers + the DeepSeek-V4 config,
the sgl-kernel payload; and upstream's own self-checks (kt doctor, kt version,
sglang.check_env; selfcheck.py)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..build import payload
from ..build.ktkernel.verify import verify_prebuilt
from ..errors import KtenvError
from ..serve import tune
from .cudacode import runs_on
from .result import FAILED, NEEDS_GPU, PASSED, SKIPPED, Context, Result, fork_server, probe, version as _v
from .selfcheck import selfcheck_results


def _import_result(ctx: Context, name: str, r: dict) -> Result:
    if r.get("died"):
        return Result("import", f"import {name}", FAILED, f"`import {name}` {r['died']}",
                      "Run the import by hand in the env to see the whole error; a signal means a native "
                      "library aborted the interpreter (e.g. apache-tvm-ffi 0.1.12 beside tilelang, "
                      "kvcache-ai/ktransformers#2045).")
    if r.get("ok"):
        note = f" (only after `import {', '.join(r['after'])}`)" if r.get("after") else ""
        return Result("import", f"import {name}", PASSED, f"imported in {r['seconds']} s{note}")
    exempt = ctx.spec.knowledge.loaders.import_exempt.get(name)
    if exempt is not None and exempt.holds(ctx.target.stack):
        return Result("import", f"import {name}", SKIPPED, f"not needed: {exempt.reason}. It fails with: {r['error'][:300]}")
    if r.get("needs_gpu"):
        after = (f"it finds the CUDA runtime only once `import {', '.join(r['after'])}` has loaded it; then it "
                 if r.get("after") else "")
        return Result("import", f"import {name}", NEEDS_GPU,
                      f"{after}fails only for want of the NVIDIA driver: {r['error'][:400]}",
                      "Run smoke on a machine with the arch's GPU and driver to import it for real.")
    return Result("import", f"import {name}", FAILED, r["error"][:800],
                  "The module is installed but does not import; the traceback tail is in the JSON report. "
                  + ctx.remedy_files() + ".", {"traceback": r.get("traceback_tail", "")})


def _import_one(ctx: Context, name: str) -> Result:
    """Import one module in its own process (see probes/fork_server.py for the "after torch" retry)."""
    with fork_server(ctx) as forks:
        return _import_result(ctx, name, forks.submit({"kind": "import", "module": name}).result())


def _versions(ctx: Context, inv: dict) -> Result:
    problems = [f"missing: {m}" for m in inv["missing"]] + inv["wrong_version"]
    damaged = [f"{d}: {v['count']} file(s) absent or resized, e.g. {', '.join(v['examples'][:3])}"
               for d, v in inv["damaged"].items()]
    evidence = (f"{inv['checked']} locked distributions installed at their locked versions"
                + (f"; {len(inv['not_for_this_python'])} not for Python {inv['python']} (markers)" if inv["not_for_this_python"] else "")
                + (f"; not in the lock: {', '.join(inv['extra'][:10])}" if inv["extra"] else ""))
    detail = {k: inv[k] for k in ("wrong_version", "missing", "not_for_this_python", "extra", "damaged", "overlapping")}
    if problems:  # other versions or packages: the env is not what its lock says, a repair cannot help
        return Result("import", "locked versions", FAILED, "; ".join(problems + damaged)[:1500],
                      f"The env no longer matches {ctx.lock.requirements}. {ctx.remedy_rebuild()}", detail)
    if damaged:  # the right distributions, with files deleted or changed
        return Result("import", "locked versions", FAILED, "; ".join(damaged)[:1500],
                      f"Files of the env were deleted or changed after it was built. {ctx.remedy_repair()}.", detail)
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
    cc = ctx.arch.cc
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
    """The variant the server will load: tune's choice when the env was tuned on this CPU (launch exports
    it), else kt-kernel's own pick by ISA rank; either must load, be runnable here and have CUDA."""
    env, expected, why = dict(ctx.env), None, "the best this CPU runs"
    tuned, _ = tune.launch_env(ctx.prefix, ["--kt-method", "MXFP4"], ctx.env)
    if tuned and not ctx.cpu_flags_given:
        env.update(tuned)
        expected, why = tuned["KT_KERNEL_CPU_VARIANT"], "the variant `tune` measured fastest here, which launch exports"
    try:
        rep = verify_prebuilt(ctx.spec.knowledge.kt_kernel, str(ctx.python), ctx.cpu_flags or None, expected=expected,
                              environ=env)
    except KtenvError as e:
        return Result("import", "kt_kernel", FAILED, str(e).split(". ")[0] + ".", str(e))
    return Result("import", "kt_kernel", PASSED,
                  f"kt-kernel {rep.get('kt_kernel_version')} loads its {rep['variant']} build ({why}; best by ISA: "
                  f"{rep['best']}); CPUInfer.submit_with_cuda_stream present (built with CUDA)", detail=rep)


def _flashinfer(ctx: Context) -> list[Result]:
    paths = ctx.spec.knowledge.loaders.paths
    needs = [(k, paths[(k, v)]) for k, v in ctx.arch.paths.items() if (k, v) in paths and paths[(k, v)].known.holds(ctx.target.stack)]
    symbols = sorted({s for _, n in needs for s in n.symbols})
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
        missing = {s: why for s, why in r["symbols"].items() if s in need.symbols and why != "ok"}
        name = f"path {key}={path}"
        low = need.min_flashinfer and _v(py) and _v(py) < _v(need.min_flashinfer)
        if not missing and not low:
            out.append(Result("import", name, PASSED, f"{len(need.symbols)} symbols sglang-kt imports for it are present"))
        elif need.required:
            why = "; ".join(f"{s}: {w}" for s, w in missing.items())
            if low:
                why = f"flashinfer {py} < {need.min_flashinfer}, which sglang-kt refuses for this path; " + why
            out.append(Result("import", name, FAILED, why[:1200], need.remedy or (
                              f"{ctx.arch.name}'s {key} runs through {path}; without these the model cannot load. "
                              "Rebuild the env from a lock made with envs/ as it is (see `build.py explain`).")))
        else:
            out.append(Result("import", name, PASSED,
                              f"not available here ({next(iter(missing.values()))[:200]}); sglang-kt falls back to "
                              f"{need.fallback}, which is what runs on {ctx.arch.name} with this env"))
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
        payload.verify_parts([p["path"] for p in parts], manifest)
        where = payload.verify_in_env(ctx.python, site)
    except KtenvError as e:
        return Result("import", name, FAILED, str(e)[:600],
                      f"{ctx.remedy_repair()}: it places the payload again, and reinstalls a carrier whose part was "
                      "deleted. Where the error says the carriers come from different releases, the lock is at fault: relock.")
    # sgl_kernel/load_utils.py: compute capability 9.0 loads sm90/, every other one sm100/.
    sub = ctx.spec.knowledge.loaders.common_ops_dir(ctx.arch.compute_capability)
    in_wheel = list((site / "sgl_kernel" / sub).glob("common_ops.*"))
    if not in_wheel and f"{sub}/common_ops.abi3.so" not in manifest.binaries:
        return Result("import", name, FAILED, f"sgl_kernel/{sub}/common_ops.* is neither installed nor in the payload",
                      f"sgl_kernel's loader picks {sub}/ on {ctx.arch.name}; the wheel carrying it is missing "
                      f"(ktransformers carries sm90/). If its files were deleted: {ctx.remedy_repair()}. If the "
                      f"distribution is not installed at all: {ctx.remedy_rebuild()}.")
    src = f"sgl_kernel/{sub}/ in the wheel" if in_wheel else f"{sub}/common_ops from the payload"
    return Result("import", name, PASSED,
                  f"{len(parts)} parts join to the manifest's sha256; the loader finds the files at {where.get('root')}; "
                  f"on {ctx.arch.name} it loads {src}", detail={"root": where.get("root")})


def _sweep(ctx: Context, inv: dict, forks) -> Result | list[Result]:
    mods = sorted({m for ms in inv["modules"].values() for m in ms})
    if ctx.modules is not None:
        mods = [m for m in mods if m in ctx.modules]
    t = time.monotonic()
    futures = [(m, forks.submit({"kind": "import", "module": m})) for m in mods]
    per_module = [_import_result(ctx, m, f.result()) for m, f in futures]
    counts = {s: sum(1 for r in per_module if r.status == s) for s in (PASSED, FAILED, NEEDS_GPU, SKIPPED)}
    sweep = Result("import", "module imports", FAILED if counts[FAILED] else PASSED,
                   f"{len(mods)} modules of {len(inv['modules'])} distributions, each in its own process, "
                   f"{ctx.workers} at a time, in {time.monotonic() - t:.0f} s: {counts[PASSED]} imported, "
                   f"{counts[NEEDS_GPU]} need the GPU driver, {counts[SKIPPED]} not needed, {counts[FAILED]} failed",
                   detail={"modules": {r.name[7:]: {"status": r.status, "evidence": r.evidence} for r in per_module}})
    return [sweep] + [r for r in per_module if r.status != PASSED]


def import_tier(ctx: Context) -> list[Result]:
    with fork_server(ctx) as forks, ThreadPoolExecutor(12) as pool:
        # The inventory needs no torch: the bare parent runs it while the warm one preloads.
        inv_run = pool.submit(forks.script, "smoke_import.py", ["inventory"], stdin={"requirements": ctx.requirements},
                              parent="bare")
        # Longest first (kt doctor starts sglang's launcher in a new process); each blocks on its own job.
        upstream = pool.submit(selfcheck_results, ctx)
        checks = [pool.submit(f, ctx) for f in (_torch, _server_args, _kt_kernel, _flashinfer, _tilelang, _transformers)]
        inv_done = inv_run.result()
        inv = inv_done.result
        if inv is None:
            return [Result("import", "inventory", FAILED, f"listing the env's distributions {inv_done.why}",
                           f"{ctx.python} cannot even read its own metadata; rebuild the env.")]
        results = [_versions(ctx, inv)]
        payload_check = pool.submit(_payload, ctx, Path(inv["site_packages"]))
        results += _sweep(ctx, inv, forks)
        for f in checks:
            got = f.result()
            results += got if isinstance(got, list) else [got]
        results.append(payload_check.result())
        results += upstream.result()
    return results
