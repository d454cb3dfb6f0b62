"""smoke: the import, kernel and launch tiers against real environments.

The slow tests build real environments from the repository's lock with uv
(hard-linked from uv's cache: seconds when the cache is warm, ~10 GB of
downloads when it is not) and break copies of them on purpose: a payload part
removed, a mismatched flashinfer-cubin, tilelang dropped, apache-tvm-ffi
0.1.12, upstream transformers over transformers-kt, a forced kt-kernel
variant, a launch flag sglang does not know. Each asserts the message a user
would read. uv replaces files by unlinking, and the tests only delete or
reinstall, so nothing in uv's cache is modified through a hard link.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktenv import spec as specmod
from ktenv import target
from ktenv.build.ktkernel.variants import best_variant
from ktenv.check import smoke, tier_import, tier_kernel, tier_launch
from ktenv.check import selfcheck
from ktenv.check.result import FAILED, NEEDS_GPU, PASSED, SKIPPED, fork_server, probe
from ktenv.host import gpu as gpumod
from ktenv.host.cpu import cpu_info
from ktenv.probes import smoke_server
from ktenv.tools import uv_bin

from conftest import TEST_ARCH, gone, run_cli

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "smoke"


# --- fast: parsing, the server lifecycle -----------------------------------------

def _fake(tmp_path, mode, **kw):
    port = smoke_server.free_port()
    pidfile = tmp_path / "child.pid"
    argv = [sys.executable, str(FIX / "fake_server.py"), mode, str(port), str(pidfile)]
    run = smoke_server.ServerRun(argv, dict(os.environ), port, tmp_path / "server.log",
                                 kt_layers=[0, 1, 2, 3], kt_experts=256, **kw)
    return run, pidfile


def _pid(pidfile: Path, within: float = 10) -> int:
    t = time.monotonic()
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() - t < within, "the fake server wrote no child pid"
        time.sleep(0.05)
    return int(pidfile.read_text())


def _step(rep, name):
    hits = [s for s in rep["steps"] if s["step"] == name]
    assert hits, f"no step {name!r} in {[s['step'] for s in rep['steps']]}"
    return hits[0]


def test_server_run_start_wait_ask_stop(tmp_path):
    run, pidfile = _fake(tmp_path, "ok")
    rep = run.check(deadline=30, prompt="hello")
    assert rep["ok"], rep
    assert [s["step"] for s in rep["steps"]] == ["start", "health", "generate", "chat", "distinct tokens", "stop",
                                                 "KT loader"]
    assert "8 tokens back (asked 8), logprobs finite" in rep["summary"]
    assert "kt-kernel loaded 256 experts of each of the 4 layers" in rep["summary"]
    assert gone(_pid(pidfile)), "the server's child process outlived stop()"
    assert not smoke_server.port_in_use(run.port)
    assert "fake server: mode ok" in (tmp_path / "server.log").read_text()


def test_server_run_reports_a_crash_with_its_log(tmp_path):
    run, _ = _fake(tmp_path, "crash")
    rep = run.check(deadline=30, prompt="hello")
    assert not rep["ok"]
    assert "health failed: the server exited (exit status 3) before it was healthy" in rep["summary"]
    assert any("no kernel image is available" in line for line in rep["log_tail"])


def test_server_run_gives_up_at_the_deadline(tmp_path):
    run, pidfile = _fake(tmp_path, "never")
    t = time.monotonic()
    rep = run.check(deadline=3, prompt="hello")
    assert not rep["ok"] and time.monotonic() - t < 20
    assert "not healthy within 3 s (last: HTTP 503" in rep["summary"]
    assert gone(_pid(pidfile))


def test_server_run_checks_the_token_count(tmp_path):
    run, _ = _fake(tmp_path, "short")
    rep = run.check(deadline=30, prompt="hello")
    assert not rep["ok"]
    assert rep["summary"].startswith("generate failed: 2 tokens back (asked 8)")
    assert _step(rep, "chat")["ok"]  # both requests are made


def test_server_run_kills_a_server_that_ignores_sigterm(tmp_path):
    run, pidfile = _fake(tmp_path, "stubborn")
    assert run.start() and run.wait_healthy(30)
    assert run.stop(grace=2)
    assert run.steps[-1]["note"] == "stopped by SIGKILL after 2 s"
    assert gone(_pid(pidfile))


def test_server_run_kills_the_group_when_the_leader_already_exited(tmp_path):
    """The leader exits and leaves a child serving the port: stop() must still kill the group."""
    run, pidfile = _fake(tmp_path, "orphan")
    rep = run.check(deadline=30, prompt="hello")
    assert not rep["ok"]
    assert "the server exited (exit status 0) before it was healthy" in rep["summary"]
    child = _pid(pidfile)
    stop = _step(rep, "stop")
    assert stop["ok"] and stop["note"].startswith("the leader had exited; the rest of its group stopped by SIGTERM"), stop
    assert gone(child), "the orphaned child still runs"
    assert not smoke_server.port_in_use(run.port)


def test_server_run_turns_http_errors_into_failures(tmp_path):
    """A truncated body (IncompleteRead) and a dropped connection (RemoteDisconnected) fail their steps."""
    run, _ = _fake(tmp_path, "http-error")
    rep = run.check(deadline=30, prompt="hello")
    assert not rep["ok"]
    assert "IncompleteRead" in _step(rep, "generate")["note"]
    assert "RemoteDisconnected" in _step(rep, "chat")["note"]
    assert _step(rep, "stop")["ok"]


def test_server_run_refuses_nan_logprobs(tmp_path):
    run, _ = _fake(tmp_path, "nan")
    rep = run.check(deadline=30, prompt="hello")
    assert not rep["ok"]
    assert "non-finite logprobs [nan" in _step(rep, "generate")["note"]
    assert "non-finite logprobs [None" in _step(rep, "chat")["note"]


def test_server_run_refuses_one_repeated_token(tmp_path):
    run, _ = _fake(tmp_path, "repeat")
    rep = run.check(deadline=30, prompt="hello")
    assert not rep["ok"] and _step(rep, "generate")["ok"] and _step(rep, "chat")["ok"]
    assert rep["summary"].startswith("distinct tokens failed: one token repeated ('Paris' x 16) over both answers")


def test_server_run_needs_the_kt_loader_lines_of_every_layer(tmp_path):
    run, _ = _fake(tmp_path, "no-kt")
    rep = run.check(deadline=30, prompt="hello")
    assert not rep["ok"]
    assert rep["summary"].startswith("KT loader failed: no '[MXFP4SafeTensorLoader] Loaded N experts from layers.L' "
                                     "line for layer(s) 2; no '[NativeMoEWrapper Layer L] load_experts ... total' "
                                     "line for layer(s) 2")
    # The same log with another expert count: the loader read the wrong checkpoint.
    problems = smoke_server.kt_log_problems((tmp_path / "server.log").read_text(), [0, 1], 128)
    assert problems == ["the loader read fewer or more experts than the model has (128): layer 0: 256, layer 1: 256"]


def test_server_run_reports_a_process_stuck_after_sigkill(tmp_path):
    """Fault injection (no user-space process survives SIGKILL on purpose): the leader
    never reaps after SIGKILL, as one stuck in the GPU driver would. The TimeoutExpired
    that Popen.wait raised there is a step failure, not an exception."""
    run, pidfile = _fake(tmp_path, "stubborn")
    assert run.start() and run.wait_healthy(30)
    real_wait, real_running = run._wait, run._leader_running
    run._wait = lambda timeout: False
    run._leader_running = lambda: True
    try:
        assert not run.stop(grace=1, kill_wait=1)
        assert "did not exit 1 s after SIGKILL" in run.steps[-1]["note"]
    finally:
        run._wait, run._leader_running = real_wait, real_running
        run.stop(grace=1)
    assert gone(_pid(pidfile))


def test_server_run_standalone_cli(tmp_path):
    port = smoke_server.free_port()
    p = subprocess.run([sys.executable, str(REPO / "ktenv/probes/smoke_server.py"), "--port", str(port),
                        "--log", str(tmp_path / "log"), "--deadline", "30", "--kt-layers", "0,1,2,3",
                        "--kt-experts", "256", "--", sys.executable, str(FIX / "fake_server.py"), "ok", str(port)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert '"ok": true' in p.stdout.splitlines()[-1]


# --- real environments -----------------------------------------------------------

ARCH = TEST_ARCH
SPEC = specmod.load(REPO / "envs")
needs_env = [pytest.mark.slow, pytest.mark.network]


def _uv(*args, check=True):
    p = subprocess.run([uv_bin(), *args], capture_output=True, text=True, timeout=1800)
    if check and p.returncode:
        raise RuntimeError(f"uv {' '.join(args)} failed: {p.stderr[-2000:]}")
    return p


def site_of(prefix: Path) -> Path:
    return next((prefix / "lib").glob("python3.*/site-packages"))


def ctx_for(prefix: Path, **kw) -> smoke.Context:
    ctx = smoke.context(target.resolve(SPEC, ARCH, lock_root=REPO / "lock", prefix=prefix))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


@pytest.fixture(scope="module")
def good_env(stack_env):
    """The env `build.py env` made (conftest's stack_env): smoke must pass on it."""
    return stack_env


@pytest.fixture
def scratch_env(tmp_path):
    """A fresh env from ktenv's own pipeline, to break on purpose (hard links into uv's cache are
    replaced, never written through: uv unlinks before it installs)."""
    prefix = tmp_path / "env"
    p = run_cli("env", "--arch", ARCH, "--prefix", str(prefix), timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return prefix


def by_name(results, name):
    hits = [r for r in results if r.name == name]
    assert hits, f"no result named {name!r} in {[r.name for r in results]}"
    return hits[0]


def _mark(f):
    for m in needs_env:
        f = m(f)
    return f


@_mark
def test_import_tier_on_a_good_env(good_env):
    results = tier_import.import_tier(ctx_for(good_env))
    failed = [(r.name, r.evidence) for r in results if r.status == FAILED]
    if ARCH == "sm90":  # the known gap: flash_mla is required on Hopper and not on PyPI (envs/sm90.toml [flash_mla])
        assert [n for n, _ in failed] == ["path sparse_mla=flash_mla"], failed
        assert "No module named 'flash_mla'" in failed[0][1]
        assert "--flash-mla-source" in by_name(results, "path sparse_mla=flash_mla").remedy
    else:
        assert not failed, failed
    assert by_name(results, "locked versions").status == PASSED
    sweep = by_name(results, "module imports")
    assert sweep.status == PASSED and sweep.detail["modules"]["torch"]["status"] == PASSED
    # Without the NVIDIA driver these can only be "needs-gpu", never "passed".
    assert by_name(results, "import sgl_kernel").status == NEEDS_GPU
    assert "libcuda.so.1" in by_name(results, "import deep_gemm").evidence
    for name in ("torch", "sglang server args", "kt_kernel", "flashinfer + cubin", "tilelang + tvm-ffi",
                 "transformers + DeepSeek-V4 config", "sgl-kernel payload"):
        assert by_name(results, name).status == PASSED, by_name(results, name)
    assert "comes from transformers-kt" in by_name(results, "transformers + DeepSeek-V4 config").evidence
    # One process per module still, each module judged; mscclpp finds the CUDA runtime only after torch.
    assert "each in its own process" in sweep.evidence
    assert "only once `import torch` has loaded it" in by_name(results, "import _mscclpp").evidence
    # Upstream's own checks: pip makes kt doctor see the fork; the rest are known quirks or need the GPU.
    doctor = by_name(results, "kt doctor -v")
    assert doctor.status == PASSED and "known false warnings: " in doctor.evidence
    assert {("SGLang Source", "sglang-kt")} <= {(r["check"], r["value"]) for r in doctor.detail["rows"]}
    assert "sglang 'Not installed'" in doctor.evidence and "transformers 'Not installed'" in doctor.evidence
    assert by_name(results, "kt version").evidence.startswith("kt-kernel 0.7.2, sglang-kt 0.7.2 (sglang-kt)")
    names = by_name(results, "upstream names")
    assert names.status == PASSED and "sglang.__version__ '0.0.0.dev0'" in names.evidence
    if not gpumod.detect().gpus:
        assert by_name(results, "kt doctor: GPU detection").status == NEEDS_GPU
    if shutil.which("nvidia-smi") is None:
        crash = by_name(results, "sglang.check_env: crash")
        assert crash.status == NEEDS_GPU and "'nvidia-smi'" in crash.evidence


@_mark
def test_kernel_and_launch_cpu_tiers_on_a_good_env(good_env):
    rep = smoke.smoke(ctx_for(good_env), ["kernel", "launch-cpu", "launch-gpu"])
    res = {r["name"]: r for r in rep["results"]}
    assert res["KT-Kernel MXFP4 MoE vs torch"]["status"] == PASSED
    assert "rel. L1" in res["KT-Kernel MXFP4 MoE vs torch"]["evidence"]
    assert res["launch command parses"]["status"] == PASSED
    assert "(5 speculative)" in res["launch command parses"]["evidence"]
    assert res["launch command parses"]["detail"]["parsed"]["speculative_algorithm"] == "EAGLE"
    assert res["DeepSeek-V4 env vars"]["status"] == PASSED
    assert res["ServerArgs validation"]["status"] == NEEDS_GPU
    if not gpumod.detect().gpus:
        gpu = res["server on a tiny DeepSeek-V4"]
        assert gpu["status"] == SKIPPED and "needs a visible" in gpu["evidence"]
    assert rep["ok"]


@_mark
def test_cli_exit_status_and_json(good_env, envs_copy, cli):
    p = cli("smoke", "--arch", ARCH, "--prefix", str(good_env), "--tier", "launch-cpu", "--json")
    assert p.returncode == 0, p.stderr
    assert '"ok": true' in p.stdout
    arch_toml = envs_copy / f"{ARCH}.toml"
    arch_toml.write_text(arch_toml.read_text().replace("[launch.args]", "[launch.args]\nno-such-flag = true", 1))
    p = cli("smoke", "--arch", ARCH, "--prefix", str(good_env), "--envs", str(envs_copy), "--tier", "launch-cpu")
    assert p.returncode == 1
    assert "FAIL launch command parses: sglang does not know --no-such-flag" in p.stdout
    assert "time: launch-cpu " in p.stdout and " s of CPU, " in p.stdout  # what each tier took
    assert "launch-cpu tier: 2 result(s), 1 failed, in " in p.stderr  # progress on stderr


@_mark
def test_launch_cpu_rejects_a_bad_value_and_a_bad_dsv4_mode(good_env):
    ctx = ctx_for(good_env, extra_args=["--kt-method", "NOT-A-METHOD"])
    ctx.env = {**ctx.env, "SGLANG_DSV4_MODE": "2605"}
    res = tier_launch.launch_cpu_tier(ctx)
    dsv4 = by_name(res, "DeepSeek-V4 env vars")
    assert dsv4.status == FAILED and "SGLANG_DSV4_MODE is '2605'" in dsv4.evidence
    parse = by_name(res, "launch command parses")
    if parse.status == PASSED:  # --kt-method takes any string in this sglang: then 2604B's rule must catch it
        ctx.env["SGLANG_DSV4_MODE"] = "2604"
        ctx.env["SGLANG_DSV4_2604_SUBMODE"] = "2604B"
        dsv4 = by_name(tier_launch.launch_cpu_tier(ctx), "DeepSeek-V4 env vars")
        assert dsv4.status == FAILED and "needs --kt-method MXFP4" in dsv4.evidence
    else:
        assert "--kt-method" in parse.evidence


@_mark
def test_removed_payload_part_and_object(scratch_env):
    site = site_of(scratch_env)
    ctx = ctx_for(scratch_env)
    assert tier_import._payload(ctx, site).status == PASSED
    obj = next(site.glob("sgl_kernel/_payload_cache/*/*/*/sgl_kernel/sm100/common_ops.abi3.so"))
    obj.unlink()
    r = tier_import._payload(ctx, site)
    assert r.status == FAILED
    assert "would not use the payload ktenv placed" in r.evidence and "extract" in r.evidence
    (site / "accelerate_kt_sgl_kernel_payload" / "payload.part").unlink()
    r = tier_import._payload(ctx, site)
    assert r.status == FAILED
    assert "`accelerate_kt_sgl_kernel_payload` should come from the accelerate-kt wheel" in r.evidence


@_mark
def test_mismatched_flashinfer_cubin(scratch_env):
    _uv("pip", "install", "--quiet", "--python", str(scratch_env / "bin/python"), "flashinfer-cubin==0.6.9")
    ctx = ctx_for(scratch_env, modules=[])
    res = tier_import._flashinfer(ctx)
    r = by_name(res, "flashinfer + cubin")
    assert r.status == FAILED
    assert "flashinfer-cubin 0.6.9" in r.evidence and "must be the same release" in r.remedy
    inv, _ = probe(ctx, "smoke_import.py", ["inventory"], {"requirements": ctx.requirements})
    v = tier_import._versions(ctx, inv)
    assert v.status == FAILED and "flashinfer-cubin: installed 0.6.9, locked" in v.evidence


@_mark
def test_tilelang_dropped_then_tvm_ffi_abort(scratch_env):
    py = str(scratch_env / "bin/python")
    _uv("pip", "install", "--quiet", "--python", py, "apache-tvm-ffi==0.1.12")
    r = tier_import._tilelang(ctx_for(scratch_env))
    assert r.status == FAILED
    assert "killed by SIGABRT" in r.evidence and "__ffi_repr__" in r.evidence
    assert "kvcache-ai/ktransformers#2045" in r.remedy
    # The fork server preloads tilelang: the abort kills its warm parent, which starts again
    # without it; tilelang fails in its own job, everything else still runs warm.
    ctx = ctx_for(scratch_env)
    with fork_server(ctx):
        r = tier_import._tilelang(ctx)
        assert tier_import._import_one(ctx, "tilelang").status == FAILED
        assert tier_import._torch(ctx).status == PASSED
    assert r.status == FAILED and "killed by SIGABRT" in r.evidence and "__ffi_repr__" in r.evidence
    assert any("warm parent died (killed by SIGABRT while importing tilelang)" in n for n in ctx.last_forks["notes"])
    assert "tilelang" not in ctx.last_forks["parents"]["warm"]["preload"]
    _uv("pip", "uninstall", "--quiet", "--python", py, "tilelang")
    r = tier_import._tilelang(ctx_for(scratch_env))
    assert r.status == FAILED and "No module named 'tilelang'" in r.evidence
    assert "DeepseekV4ForCausalLM not registered" in r.remedy


@_mark
def test_upstream_transformers_over_transformers_kt(scratch_env):
    _uv("pip", "install", "--quiet", "--python", str(scratch_env / "bin/python"), "transformers==4.57.1")
    r = tier_import._transformers(ctx_for(scratch_env))
    assert r.status == FAILED
    assert "transformers-kt" in r.evidence and "transformers," in r.evidence.replace("transformers-kt", "")


@_mark
def test_kt_kernel_variant_checks(good_env):
    ctx = ctx_for(good_env)
    ctx.env = {**ctx.env, "KT_KERNEL_CPU_VARIANT": "avx512"}
    r = tier_import._kt_kernel(ctx)
    assert r.status == FAILED and "KT_KERNEL_CPU_VARIANT='avx512' is not a kt-kernel variant" in r.evidence
    # The same env judged for an AVX2-only CPU: what this host loads would die with SIGILL there.
    haswell = (REPO / "tests/fixtures/cpuinfo/haswell-e-i7-5820k.txt").read_text()
    ctx = ctx_for(good_env, cpu_flags=cpu_info(haswell).flags, cpu_flags_given=True)
    if best_variant(SPEC.knowledge.kt_kernel, cpu_info().flags) == "avx2":
        pytest.skip("this host is AVX2-only itself: nothing above AVX2 loads here")
    r = tier_import._kt_kernel(ctx)
    assert r.status == FAILED and "SIGILL" in r.remedy


@_mark
def test_broken_module_and_missing_kt_kernel(scratch_env):
    site = site_of(scratch_env)
    (site / "einops" / "einops.py").unlink()  # einops/__init__.py imports it
    ctx = ctx_for(scratch_env, modules=["einops", "idna"])
    inv, _ = probe(ctx, "smoke_import.py", ["inventory"], {"requirements": ctx.requirements})
    v = tier_import._versions(ctx, inv)
    assert v.status == FAILED and "einops: 1 file(s) absent or resized, e.g. einops/einops.py (missing)" in v.evidence
    assert tier_import._import_one(ctx, "idna").status == PASSED
    r = tier_import._import_one(ctx, "einops")
    assert r.status == FAILED and "No module named 'einops.einops'" in r.evidence
    _uv("pip", "uninstall", "--quiet", "--python", str(scratch_env / "bin/python"), "kt-kernel")
    k = tier_kernel.kernel_tier(ctx)[0]
    assert k.status == FAILED and "kt_kernel" in k.evidence


@_mark
def test_torch_against_another_cuda(good_env):
    ctx = ctx_for(good_env)
    ctx.lock.cuda = "13.0"
    r = tier_import._torch(ctx)
    assert r.status == FAILED and "the stack needs CUDA 13.0" in r.evidence


@_mark
def test_tiny_model_is_read_back_by_the_real_loaders(good_env, tmp_path):
    ctx = ctx_for(good_env)
    r, why = probe(ctx, "smoke_tiny_model.py", [str(tmp_path / "m"), "--experts", "16"])
    assert r and r["ok"], (why, r)
    assert "kt-kernel's MXFP4 loader (all 4 layers)" in r["summary"] and r["experts"]["tensors"] == 4 * 16 * 6
    assert r["kt_layers"] == [0, 1, 2, 3] and r["n_routed_experts"] == 16
    assert "rope_scaling" in r["fields_checked"] and "swiglu_limit" in r["fields_checked"]
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV4ForCausalLM"] and len(cfg["compress_ratios"]) == 5
    # V4-Flash's YaRN parameters are kept (without them sglang fails with KeyError: 'factor'),
    # and every id the dummy model can emit is a token of the tokenizer.
    assert {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow"} <= set(cfg["rope_scaling"])
    assert cfg["vocab_size"] == r["tokenizer"]["vocab"] and cfg["vocab_size"] % 64 == 0


@_mark
def test_kt_doctor_and_kt_version_without_pip(scratch_env):
    _uv("pip", "uninstall", "--quiet", "--python", str(scratch_env / "bin/python"), "pip")
    ctx = ctx_for(scratch_env)
    res = selfcheck.kt_cli(ctx, *probe(ctx, "selfcheck.py", ["kt_cli"]))
    doctor, version = by_name(res, "kt doctor -v"), by_name(res, "kt version")
    assert doctor.status == FAILED and "SGLang Source: 'PyPI sglang (not kvcache-ai fork)'" in doctor.evidence
    assert version.status == FAILED and "sglang-kt: '0.7.2 (PyPI)'" in version.evidence
    assert "This env has no pip" in doctor.remedy and "pip-for-upstream-tools" in doctor.remedy


@_mark
def test_a_selfcheck_warning_no_entry_explains_fails(good_env, envs_copy):
    """kt doctor's "sglang: Not installed" is a quirk only because loaders.toml says so."""
    text = (envs_copy / "loaders.toml").read_text()
    start = text.index('[[selfcheck]]\ntool = "kt doctor"\nitem = "sglang"')
    (envs_copy / "loaders.toml").write_text(text[:start] + text[text.index("[[selfcheck]]", start + 1):])
    ctx = smoke.context(target.resolve(specmod.load(envs_copy), ARCH, lock_root=REPO / "lock", prefix=good_env))
    doctor = by_name(selfcheck.kt_cli(ctx, *probe(ctx, "selfcheck.py", ["kt_cli"])), "kt doctor -v")
    assert doctor.status == FAILED and doctor.evidence.startswith("kt doctor warns: sglang: 'Not installed'")
    assert "state it in envs/loaders.toml [[selfcheck]]" in doctor.remedy


@_mark
def test_check_env_runs_to_the_end_where_nvidia_smi_answers(good_env, tmp_path):
    """With an nvidia-smi that fails (a driver without a GPU), sglang.check_env prints its
    table: its "Module Not Found" lines are naming quirks or packages outside this stack."""
    if gpumod.detect().gpus:
        pytest.skip("a GPU is visible: check_env runs for real in test_import_tier_on_a_good_env")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices' >&2\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    ctx = ctx_for(good_env)
    ctx.env = {**ctx.env, "PATH": f"{bin_dir}:{ctx.env['PATH']}"}
    res = selfcheck.check_env(ctx, *probe(ctx, "selfcheck.py", ["sglang_check_env"]))
    assert [r.status for r in res] == [PASSED], res
    ev = res[0].evidence
    assert "sgl_kernel 'Module Not Found'" in ev and "sglang 'Module Not Found'" in ev
    assert "not part of this stack: " in ev and "vllm" in ev


@_mark
def test_a_probe_forked_from_the_server_answers_as_a_new_process_does(good_env):
    ctx = ctx_for(good_env)
    fresh = [probe(ctx, "smoke_import.py", ["check", name]) for name in ("torch", "transformers")]
    with fork_server(ctx) as forks:
        forked = [probe(ctx, "smoke_import.py", ["check", name]) for name in ("torch", "transformers")]
        assert forks.serves(ctx.env) and not forks.serves({**ctx.env, "SGLANG_DSV4_MODE": "2601"})
    for (a, _), (b, _) in zip(fresh, forked):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    warm = ctx.last_forks["parents"]["warm"]
    assert warm["preload"]["torch"]["ok"]
    if ctx.last_forks["driver"]:
        # With the NVIDIA driver, no preload may leave children unable to use the GPU.
        assert warm["cuda_in_children"] and "sglang.srt.server_args" not in warm["preload"]
    else:
        assert "sglang.srt.server_args" in warm["preload"]
