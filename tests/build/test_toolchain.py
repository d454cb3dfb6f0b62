"""The CUDA toolchain: pinned sources, provisioning, the torch/arch rules, activation,
kt-kernel's nvcc check, and the toolchain smoke tier.

Real parts: the CUDA 12 toolkit is Debian's 12.4 provisioned from its pinned
.debs (scripts/bootstrap.sh fetches it; the fixture does the same and is a
no-op when it is cached); the CUDA 13 nvcc is PyPI's nvidia-cuda-nvcc (a test
dependency); compiles run the real nvcc and the real env (.envs/sm90).
NVIDIA's redist archives (CUDA 12.8) cannot be downloaded here: their pins
are checked for form only, and provisioning is tested with the Debian source.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cuda12_home, cuda13_home, run_cli
from ktenv import spec as specmod
from ktenv.build import activate, cuda_fetch, toolchain
from ktenv.errors import KtenvError, SpecError
from ktenv.spec.toolchain import Archive, Source

POLICY = toolchain.load(REPO / "envs")
DEBIAN = next(s for s in POLICY.sources if s.name == "debian-trixie-12.4")


@pytest.fixture(scope="session")
def cuda12() -> toolchain.Toolkit:
    """Debian's CUDA 12.4, provisioned from its pinned archives (cached after the first run)."""
    tk = toolchain.inspect(cuda12_home(), "test")
    assert tk is not None and tk.version == "12.4.131"
    return tk


@pytest.fixture(scope="session")
def cuda13() -> toolchain.Toolkit:
    """PyPI's nvidia-cuda-nvcc 13 (a test dependency): a real CUDA 13 nvcc."""
    tk = toolchain.inspect(cuda13_home(), "test")
    assert tk is not None and tk.version.startswith("13.")
    return tk


def need(arch: str) -> toolchain.Need:
    return toolchain.need(POLICY, arch, "12.8")


# --- envs/toolchain.toml ---------------------------------------------------------------

def test_every_supported_arch_has_a_compiler_rule_and_every_archive_is_pinned():
    spec = specmod.load(REPO / "envs")
    supported = {a.name for a in spec.archs.values() if a.supported}
    assert supported <= set(POLICY.archs), f"no [arch.X] in envs/toolchain.toml for {supported - set(POLICY.archs)}"
    assert POLICY.archs["sm120"].min_nvcc == "12.8" and POLICY.archs["sm100"].min_nvcc == "12.8"
    for src in POLICY.sources:
        assert src.reason and src.archives
        for a in src.archives:
            assert len(a.sha256) == 64 and a.size > 0 and a.map


def test_an_unpinned_archive_is_a_spec_error(envs_copy):
    path = envs_copy / "toolchain.toml"
    path.write_text(path.read_text().replace('sha256 = "9961b3484b6b71314063709a4f9529654f96782ad39e72bf1e00f070db8210d3"',
                                             'sha256 = "latest"'))
    with pytest.raises(SpecError, match="no valid sha256"):
        toolchain.load(envs_copy)


def test_archive_map_takes_folders_files_and_versioned_names():
    a = next(x for x in DEBIAN.archives if "libcudart12" in x.path)
    assert a.dest("./usr/lib/x86_64-linux-gnu/libcudart.so.12.4.127") == "lib64/libcudart.so.12.4.127"
    assert a.dest("./usr/share/doc/libcudart12/copyright") is None
    t = next(x for x in DEBIAN.archives if "nvidia-cuda-toolkit_" in x.path)
    assert t.dest("./usr/include/nvvm.h") == "include/nvvm.h"
    assert t.dest("./usr/include/") is None  # the folder entry itself
    assert t.dest("./usr/bin/nvcc") is None  # Debian's wrapper script; the real nvcc is mapped instead


# --- provisioning ----------------------------------------------------------------------

def test_a_wrong_archive_is_refused_before_anything_is_extracted(tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    first = DEBIAN.archives[0]
    (bad / first.filename).write_bytes(b"not the pinned file")
    root = tmp_path / "cache"
    with pytest.raises(KtenvError, match="is not the pinned") as e:
        cuda_fetch.provision(DEBIAN, root=root, from_dir=bad, progress=lambda m: None)
    assert hashlib.sha256(b"not the pinned file").hexdigest() in str(e.value)
    assert not (root / DEBIAN.name).exists() and not list(root.glob(".*.tmp"))


def test_provisioned_toolkit_is_complete_and_relocatable(cuda12, tmp_path):
    home = Path(cuda12.home)
    assert json.loads((home / cuda_fetch.MANIFEST).read_text())["version"] == "12.4.131"
    for f in ("bin/nvcc", "bin/ptxas", "bin/cudafe++", "bin/fatbinary", "nvvm/bin/cicc",
              "nvvm/libdevice/libdevice.10.bc", "include/cuda_runtime.h", "include/cublas_v2.h",
              "include/cub/cub.cuh", "include/thrust/version.h", "lib64/libcudart.so", "lib64/stubs/libcuda.so"):
        assert (home / f).exists(), f
    # nvcc finds everything relative to itself: a copy elsewhere still reports its version.
    copy = tmp_path / "moved"
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
    assert cuda_fetch.nvcc_release(copy / "bin" / "nvcc") == "12.4.131"


# --- the rules ---------------------------------------------------------------------------

def test_cuda13_nvcc_is_refused_with_torchs_reason(cuda13):
    problems = toolchain.problems(cuda13, need("sm90"))
    assert "mismatches the version that was used to compile PyTorch (12.8)" in problems["major"]
    choice = toolchain.select(POLICY, need("sm90"), environ={"PATH": os.defpath}, cuda_home=cuda13.home)
    assert choice.toolkit is None  # an explicit --cuda-home is never silently replaced
    assert "torch is built for CUDA 12.8" in choice.remedy and "--provision" in choice.remedy


def test_cuda12_4_is_refused_for_blackwell_and_chosen_for_hopper(cuda12):
    assert "needs CUDA >= 12.8" in toolchain.problems(cuda12, need("sm120"))["arch"]
    assert "needs CUDA >= 12.8" in toolchain.problems(cuda12, need("sm100"))["arch"]
    assert toolchain.problems(cuda12, need("sm90")) == {} and toolchain.problems(cuda12, need("sm89")) == {}
    choice = toolchain.select(POLICY, need("sm90"), environ={"PATH": os.defpath}, cuda_home=cuda12.home)
    assert choice.toolkit.version == "12.4.131"
    assert any("minor mismatch" in n for n in choice.notes)
    refused = toolchain.select(POLICY, need("sm120"), environ={"PATH": os.defpath}, cuda_home=cuda12.home)
    assert refused.toolkit is None and "cannot compile for sm120" in refused.remedy


def test_the_arch_rule_is_what_nvcc_does(cuda12, tmp_path):
    """The 12.4 nvcc really compiles sm_90a and really refuses sm_120a (the rule is not a guess)."""
    cu = tmp_path / "k.cu"
    cu.write_text("#include <cuda_runtime.h>\n__global__ void k(float* x) { x[threadIdx.x] *= 2.f; }\n")
    ok = subprocess.run([cuda12.nvcc, "-arch=sm_90a", "-c", str(cu), "-o", str(tmp_path / "k90.o")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([cuda12.nvcc, "-arch=sm_120a", "-c", str(cu), "-o", str(tmp_path / "k120.o")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "sm_120a" in bad.stderr


def test_candidates_prefer_torchs_release_then_the_newest(cuda12, cuda13):
    env = {"PATH": os.defpath, "CUDA_HOME": cuda13.home}
    choice = toolchain.select(POLICY, need("sm90"), environ=env, prefix=None)
    # CUDA_HOME (13) is looked at first and passed over with its reason; a CUDA 12 one is used.
    assert choice.toolkit is not None and choice.toolkit.version.startswith("12.")
    assert any(r["home"] == cuda13.home and "CUDA 13" in r["problems"][0] for r in choice.rejected)


def test_one_compiler_under_two_homes_is_explained_once(cuda13, tmp_path):
    # The shape of this test machine: /usr/local/bin/nvcc is a script that
    # execs cuda-13.0's nvcc, so /usr/local and cuda-13.0 are two homes of one
    # compiler. The remedy names both and gives torch's long reason once.
    wrapper = tmp_path / "wrap"
    (wrapper / "bin").mkdir(parents=True)
    script = wrapper / "bin" / "nvcc"
    script.write_text(f'#!/bin/sh\nexec {cuda13.nvcc} "$@"\n')
    script.chmod(0o755)
    env = {"PATH": f"{wrapper / 'bin'}:{os.defpath}", "CUDA_HOME": cuda13.home}
    choice = toolchain.select(POLICY, need("sm120"), environ=env, prefix=None)
    assert choice.toolkit is None
    homes = {r["home"] for r in choice.rejected}
    assert {str(wrapper), cuda13.home} <= homes
    reason = next(r["problems"][0] for r in choice.rejected if r["home"] == cuda13.home)
    assert choice.summary.count(reason) == 1
    named = choice.summary.split(f": {reason}")[0].rsplit("; ", 1)[-1]  # the homes given this reason
    assert f"{cuda13.home} ({cuda13.version})" in named and f"{wrapper} ({cuda13.version})" in named


def test_host_compiler_is_one_nvcc_accepts(cuda12):
    cc, cxx, note = toolchain.host_compiler(cuda12, POLICY, {"PATH": os.defpath})
    assert cxx and "accepts GCC <= 13" in note
    strict = toolchain.Policy(POLICY.path, {"12.4": 5}, POLICY.archs, POLICY.min_nvcc_by_sm, POLICY.sources)
    cc, cxx, note = toolchain.host_compiler(cuda12, strict, {"PATH": os.defpath})
    assert cxx is None and "no GCC <= 5" in note


# --- activation ---------------------------------------------------------------------------

def _venv(tmp_path: Path, cublas: bool) -> Path:
    p = tmp_path / "env"
    (p / "bin").mkdir(parents=True)
    (p / "pyvenv.cfg").write_text("home = /usr/bin\n")
    inc = p / "lib/python3.11/site-packages/nvidia/cublas/include"
    inc.mkdir(parents=True)
    if cublas:
        (inc / "cublas_v2.h").write_text("/* the wheel's header */\n")
    return p


def test_activation_puts_the_env_and_the_toolkit_first(cuda12, tmp_path):
    prefix = _venv(tmp_path, cublas=True)
    ch = toolchain.select(POLICY, need("sm90"), environ={"PATH": os.defpath}, cuda_home=cuda12.home)
    env = activate.activation(prefix, ch, {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "CUDA_HOME": "/usr/local/cuda-13.0"})
    assert env["PATH"].split(":")[:2] == [str(prefix / "bin"), str(Path(cuda12.home) / "bin")]
    assert env["CUDA_HOME"] == cuda12.home and env["VIRTUAL_ENV"] == str(prefix) and "PYTHONPATH" not in env
    # The toolkit has cublas_v2.h itself, so the wheel's copy is not added.
    assert env["CPATH"] == str(Path(cuda12.home) / "include")
    assert env["CXX"] == env["NVCC_CCBIN"] == ch.host_cxx
    # Round trip through the stamp record: activation reads back what `env` recorded.
    assert activate.changes(prefix, ch.record(), {"PATH": "/usr/bin"}) == activate.changes(prefix, ch, {"PATH": "/usr/bin"})


def test_activation_adds_wheel_headers_a_minimal_toolkit_lacks_and_conda_targets(tmp_path):
    """A conda-style toolkit: nvcc in the prefix, headers only under targets/x86_64-linux/include."""
    prefix = _venv(tmp_path, cublas=True)
    (prefix / "conda-meta").mkdir()
    inc = prefix / "targets/x86_64-linux/include"
    inc.mkdir(parents=True)
    (inc / "cuda_runtime.h").write_text("/* runtime */\n")
    tk = toolchain.Toolkit(str(prefix), str(prefix / "bin/nvcc"), "12.8.93", "the env's prefix", toolchain._include_dirs(prefix))
    assert tk.include_dirs == [str(inc)]
    env = activate.changes(prefix, tk, {"PATH": "/usr/bin"})
    assert env["CONDA_PREFIX"] == str(prefix)
    assert env["CPATH"].split(":") == [str(inc), str(prefix / "lib/python3.11/site-packages/nvidia/cublas/include")]
    assert "export CUDA_HOME=" in activate.shell_exports(env)


# --- kt-kernel's prerequisite check uses the same test ------------------------------------

def _kt_problems(tmp_path, home: str, archs: str, python: str) -> list[str]:
    from ktenv.build.ktkernel import prereq
    from test_ktkernel import standin

    env = dict(os.environ, CUDA_HOME=home)
    kt = specmod.load(REPO / "envs").knowledge.kt_kernel
    return [p for p in prereq.check_build_prerequisites(kt, standin(tmp_path), python, "avx2", env, cuda_archs=archs)
            if "nvcc" in p]


def test_ktkernel_refuses_cuda12_4_for_arch_120_and_accepts_it_without(cuda12, tmp_path):
    problems = _kt_problems(tmp_path / "a", cuda12.home, "80;86;89;90;120", sys.executable)
    assert len(problems) == 1 and "sm_120 is a target since CUDA 12.8" in problems[0], problems
    assert _kt_problems(tmp_path / "b", cuda12.home, "89;90", sys.executable) == []


def test_ktkernel_refuses_an_nvcc_of_another_major_than_the_envs_torch(cuda13, tmp_path, stack_python):
    py = stack_python
    problems = _kt_problems(tmp_path, cuda13.home, "89;90", str(py))
    assert any("CUDA 13, but torch is built for CUDA 12.8" in p for p in problems), problems


# --- the toolchain tier ------------------------------------------------------------------

@pytest.fixture
def ctx_for(stack_env):
    """A smoke context on the real env, judged for `arch` (the four locks hold the same files)."""
    from ktenv.check import smoke
    from ktenv.target import Target

    spec = specmod.load(REPO / "envs")

    def make(arch: str, env: dict):
        t = Target(spec, spec.arch(arch), spec.stack.default, REPO / "lock" / arch, stack_env)
        ctx = smoke.context(t)
        ctx.env.update(env)
        return ctx

    return make


def _by(results, name):
    return next(r for r in results if r.name == name)


def test_tier_refuses_cuda13_with_torchs_reason_and_skips_the_compiles(cuda13, ctx_for):
    from ktenv.check.toolchain_tier import toolchain_tier

    results = toolchain_tier(ctx_for("sm90", {"KTENV_CUDA_HOME": cuda13.home}))
    first = _by(results, "toolchain")
    assert first.status == "failed" and "mismatches the version that was used to compile PyTorch" in first.evidence
    assert all(r.status == "skipped" for r in results if r.name.startswith("compile "))


def test_tier_refuses_cuda12_4_for_sm120(cuda12, ctx_for):
    from ktenv.check.toolchain_tier import toolchain_tier

    results = toolchain_tier(ctx_for("sm120", {"KTENV_CUDA_HOME": cuda12.home}))
    assert _by(results, "toolchain").status == "failed"
    assert "cannot compile for sm120" in _by(results, "toolchain").evidence
    assert [r.name for r in results if r.name.startswith("compile ")] == [
        "compile linear_bf16_fp32", "compile fused_rope", "compile hc_split_sinkhorn", "compile indexer"]


@pytest.mark.slow
def test_tier_compiles_the_sm90_jit_kernels_with_cuda12(cuda12, stack_env):
    """The real thing: sglang-kt's own JIT entry points, compiled for sm_90a without a GPU."""
    p = run_cli("smoke", "--arch", "sm90", "--prefix", str(stack_env), "--tier", "toolchain", "--json",
                env=dict(os.environ, KTENV_CUDA_HOME=cuda12.home), timeout=3600)
    rep = json.loads(p.stdout)
    status = {r["name"]: r["status"] for r in rep["results"]}
    assert status == {"toolchain": "passed", "nvcc vs torch": "passed", "nvcc vs sm90": "passed", "JIT lookups": "passed",
                      "compile linear_bf16_fp32": "passed", "compile fused_rope": "passed",
                      "compile hc_split_sinkhorn": "passed", "compile deep_gemm": "passed"}, p.stdout[-3000:]
    dg = next(r for r in rep["results"] if r["name"] == "compile deep_gemm")["detail"]
    assert dg["target"] == "sm_90a" and dg["bytes"] > 0
    assert p.returncode == 0


def test_a_redist_style_tar_xz_source_provisions(cuda12, tmp_path):
    """NVIDIA's redist archives cannot be downloaded here; the same code path runs on a
    .tar.xz in their layout (<name>-archive/bin, include, lib), made from the real 12.4 files."""
    import lzma
    import tarfile

    top = "cuda_nvcc-linux-x86_64-12.4.131-archive"
    arc = tmp_path / "in" / f"{top}.tar.xz"
    arc.parent.mkdir()
    home = Path(cuda12.home)
    with lzma.open(arc, "wb", preset=0) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for rel in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so.12.4.127"):
            tar.add(home / rel, arcname=f"{top}/{rel.replace('lib64/', 'lib/')}")
    digest = hashlib.sha256(arc.read_bytes()).hexdigest()
    a = Archive(arc.name, digest, arc.stat().st_size,
                           ((f"{top}/bin/", "bin/"), (f"{top}/include/", "include/"), (f"{top}/lib/", "lib64/")))
    src = Source("redist-style", "12.4.131", "https://unreachable.invalid/", (a,), "test")
    got = cuda_fetch.provision(src, root=tmp_path / "cache", from_dir=arc.parent, progress=lambda m: None)
    assert (got / "include/cuda_runtime.h").exists() and (got / "lib64/libcudart.so.12.4.127").exists()
    assert cuda_fetch.installed(src, tmp_path / "cache") == got
    tk = toolchain.inspect(got, "test")
    assert tk.version == "12.4.131" and tk.include_dirs == [str(got / "include")]
