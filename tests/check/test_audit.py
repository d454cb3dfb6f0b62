"""audit: CUDA arch coverage, on binaries made by NVIDIA's real compiler and read by the real cuobjdump.

nvcc and cuobjdump come from PyPI (nvidia-cuda-nvcc, nvidia-cuda-cuobjdump):
the tests compile a tiny kernel into shared objects and cubins with chosen
SASS/PTX targets, lay them out the way sgl_kernel ships its ops in a scratch
venv, and audit that venv for several archs. A slow test audits a real
environment built from the lock.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ktenv import spec as specmod
from ktenv.check import audit, cudacode
from ktenv.check import cuobjdump as cuobj
from ktenv.target import Target
from ktenv.tools import uv_bin


SPEC = specmod.load(Path(__file__).resolve().parents[2] / "envs")


def target(arch: str, prefix: Path) -> Target:
    """A target for an env at prefix (hand-made venvs of real nvcc output, or the real env)."""
    return Target(SPEC, SPEC.arch(arch), SPEC.stack.default, Path(__file__).resolve().parents[2] / "lock" / arch, prefix)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "smoke"
NVCC_REQ = "nvidia-cuda-nvcc==13.5.37"
KERNEL = r"""
extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }
extern "C" void launch(float* x) { add_one<<<1, 32>>>(x); }
"""


# --- the compatibility rules ---------------------------------------------------------

@pytest.mark.parametrize("code,kind,cc,ok", [
    ("sm_86", "sass", (8, 9), True),     # same major, older minor: binary compatible
    ("sm_89", "sass", (8, 6), False),    # never backwards
    ("sm_90", "sass", (12, 0), False),   # never across majors
    ("sm_90a", "sass", (9, 0), True),
    ("sm_100a", "sass", (10, 3), False),  # 'a' runs on exactly that capability
    ("sm_120a", "sass", (12, 1), False),
    ("sm_100f", "sass", (10, 3), True),   # 'f': the family
    ("sm_80", "ptx", (12, 0), True),      # PTX JIT-compiles forward
    ("sm_90", "ptx", (8, 9), False),
    ("sm_90a", "ptx", (10, 0), False),
])
def test_runs_on(code, kind, cc, ok):
    assert cudacode.runs_on(code, cc, kind) is ok


def test_parse_recorded_listings():
    elf = cuobj.parse_listing((FIX / "cuobjdump-lelf-spatial_ops.txt").read_text())
    assert elf["sass"] == {c: 1 for c in ("sm_90", "sm_80", "sm_86", "sm_89", "sm_100a", "sm_120a", "sm_90a")}
    ptx = cuobj.parse_listing((FIX / "cuobjdump-lptx-mscclpp.txt").read_text())
    assert ptx == {"sass": {}, "ptx": {"sm_80": 1, "sm_90": 1}}
    assert cuobj.parse_listing((FIX / "cuobjdump-lptx-none.txt").read_text()) == {"sass": {}, "ptx": {}}
    cov = cudacode.coverage({**elf, "ptx": {}}, (12, 0))
    assert cov["ok"] and cov["sass"] == {"sm_120a": 1}
    assert not cudacode.coverage({**elf, "ptx": {}}, (12, 1))["ok"]
    assert cudacode.coverage(ptx, (10, 0)) == {"ok": True, "sass": {}, "ptx": {"sm_80": 1, "sm_90": 1}}


def test_roles_follow_sgl_kernels_loader():
    sm90, sm120, sm100 = SPEC.arch("sm90"), SPEC.arch("sm120"), SPEC.arch("sm100")
    assert audit.role("sgl_kernel/sm90/common_ops.abi3.so", sm90, SPEC.knowledge.loaders).kind == "loaded"
    assert audit.role("sgl_kernel/sm90/common_ops.abi3.so", sm120, SPEC.knowledge.loaders).kind == "not-loaded"
    payload = "sgl_kernel/_payload_cache/sgl-kernel-kt/0.3.21.post2/8f0b5d761342374e/sgl_kernel/sm100/common_ops.abi3.so"
    assert audit.role(payload, sm120, SPEC.knowledge.loaders).kind == "loaded" and audit.role(payload, sm90, SPEC.knowledge.loaders).kind == "not-loaded"
    moe = "flashinfer_cubin/cubins/3d9dd08b/batched_gemm-4fc8a68-6743435/x_sm100f.cubin"
    assert audit.role(moe, sm100, SPEC.knowledge.loaders).kind == "loaded" and audit.role(moe, sm120, SPEC.knowledge.loaders).kind == "on-demand"
    assert audit.role(moe, sm100, SPEC.knowledge.loaders).group == "flashinfer_cubin/batched_gemm"
    assert audit.role("nvidia/cufft/lib/libcufft.so.11", sm90, SPEC.knowledge.loaders).kind == "on-demand"
    assert audit.role("torch/lib/libtorch_cuda.so", sm90, SPEC.knowledge.loaders).kind == "loaded"


# --- real compiler, real cuobjdump ---------------------------------------------------

# nvcc needs a host C++ compiler: g++, which the README's set-up installs.
slow_net = [pytest.mark.slow, pytest.mark.network]


def _mark(f):
    for m in slow_net:
        f = m(f)
    return f


@pytest.fixture(scope="module")
def cuobjdump():
    path, how = cuobj.find_cuobjdump(install=True)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Real binaries from nvcc: (dir, {name: path})."""
    root = tmp_path_factory.mktemp("nvcc")
    venv = root / "nvcc"
    subprocess.run([uv_bin(), "venv", "--quiet", str(venv)], check=True)
    subprocess.run([uv_bin(), "pip", "install", "--quiet", "--python", str(venv / "bin/python"), NVCC_REQ], check=True)
    nvcc = next(venv.glob("lib/python3*/site-packages/nvidia/*/bin/nvcc"))
    src = root / "k.cu"
    src.write_text(KERNEL)
    out = {}
    for name, flags in {
        "sass89.so": ["-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_89,code=sm_89"],
        "ptx80.so": ["-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_80,code=[sm_80,compute_80]"],
        "sass90a_120a.so": ["-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90a,code=sm_90a",
                            "-gencode", "arch=compute_120a,code=sm_120a"],
        "k100f.cubin": ["-cubin", "-arch=sm_100f"],
        "k90a.cubin": ["-cubin", "-arch=sm_90a"],
        "host_only.so": None,
    }.items():
        dst = root / name
        if flags is None:  # a shared object without device code
            (root / "h.cpp").write_text("extern \"C\" int f() { return 1; }\n")
            subprocess.run(["g++", "-shared", "-fPIC", str(root / "h.cpp"), "-o", str(dst)], check=True)
        else:
            subprocess.run([str(nvcc), *flags, str(src), "-o", str(dst)], check=True, capture_output=True)
        out[name] = dst
    return root, out


@_mark
def test_cuobjdump_lists_what_nvcc_built(cuobjdump, built):
    _, b = built
    assert cuobj.list_codes(cuobjdump, b["sass89.so"])["sass"].keys() == {"sm_89"}
    ptx = cuobj.list_codes(cuobjdump, b["ptx80.so"])
    assert ptx["sass"].keys() == {"sm_80"} and ptx["ptx"].keys() == {"sm_80"}
    assert cuobj.list_codes(cuobjdump, b["sass90a_120a.so"])["sass"].keys() == {"sm_90a", "sm_120a"}
    # cuobjdump names a family cubin by its base arch; the rules treat sm_100 and sm_100f alike.
    assert cuobj.list_codes(cuobjdump, b["k100f.cubin"])["sass"].keys() == {"sm_100"}
    assert cuobj.list_codes(cuobjdump, b["host_only.so"]) == {"sass": {}, "ptx": {}, "device_code": False}


def _fake_env(tmp_path, files: dict[str, Path]) -> Path:
    """A real venv whose site-packages holds the given binaries at the given paths."""
    venv = tmp_path / "env"
    subprocess.run([uv_bin(), "venv", "--quiet", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    for rel, src in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, site / rel)
    return venv


@_mark
def test_audit_fails_naming_the_binary_the_loader_picks(cuobjdump, built, tmp_path):
    _, b = built
    # sgl_kernel's layout: sm90/ with SASS for 8.9 only, sm100/ with PTX from 8.0.
    venv = _fake_env(tmp_path, {"sgl_kernel/sm90/common_ops.abi3.so": b["sass89.so"],
                                "sgl_kernel/sm100/common_ops.abi3.so": b["ptx80.so"],
                                "sgl_kernel/flashmla_ops.abi3.so": b["sass90a_120a.so"],
                                "host_only.so": b["host_only.so"]})
    cache = tmp_path / "cache.json"
    r = audit.audit(target("sm90", venv), cuobjdump, "test", cache)
    assert not r["ok"]
    assert [f["binary"] for f in r["failures"]] == ["sgl_kernel/sm90/common_ops.abi3.so"]
    assert "SASS sm_89" in r["failures"][0]["why"] and "nothing runs on compute capability 9.0" in r["failures"][0]["why"]
    assert r["without_device_code"] == 1
    assert "FAILED: 1 binary the sm90 path loads cannot run there" in audit.render(r)
    # sm120 and sm89 load sm100/: PTX from compute_80 JIT-compiles there.
    r = audit.audit(target("sm120", venv), cuobjdump, "test", cache)
    assert r["ok"], r["failures"]
    loaded = {x["binary"]: x for x in r["binaries"]}["sgl_kernel/sm100/common_ops.abi3.so"]
    assert loaded["role"] == "loaded" and loaded["via"] == "PTX JIT from sm_80"
    assert r["timing"]["listed"] == 0 and r["timing"]["cached"] == 4  # second audit: everything from the cache
    flashmla = {x["binary"]: x for x in r["binaries"]}["sgl_kernel/flashmla_ops.abi3.so"]
    assert flashmla["runs_on_arch"] and flashmla["via"].startswith("SASS sm_120a")  # nvcc -shared lists each cubin twice


@_mark
def test_audit_of_cubin_groups(cuobjdump, built, tmp_path):
    _, b = built
    moe = "flashinfer_cubin/cubins/3d9dd08b/batched_gemm-4fc8a68-6743435/"
    venv = _fake_env(tmp_path, {moe + "a_sm100f.cubin": b["k100f.cubin"], moe + "b_sm90a.cubin": b["k90a.cubin"]})
    r = audit.audit(target("sm100", venv), cuobjdump, "test", tmp_path / "c.json")
    g = r["groups"][0]
    assert g["group"] == "flashinfer_cubin/batched_gemm" and g["role"] == "loaded" and (g["covered"], g["files"]) == (1, 2)
    assert not r["ok"] and r["failures"][0]["binary"].endswith("b_sm90a.cubin")
    assert "1 of 2 cubins in flashinfer_cubin/batched_gemm have no code for compute capability 10.0" in r["failures"][0]["why"]
    r = audit.audit(target("sm120", venv), cuobjdump, "test", tmp_path / "c.json")
    assert r["ok"] and r["groups"][0]["role"] == "on-demand"  # sm120's MoE path does not load them


@_mark
def test_audit_of_a_real_env(cuobjdump, stack_env):
    """The env `build.py env` made, audited for Hopper and for Blackwell (the four locks hold the same files)."""
    env = stack_env
    r90 = audit.audit(target("sm90", env), cuobjdump, "test")
    by = {b["binary"]: b for b in r90["binaries"]}
    assert by["sgl_kernel/sm90/common_ops.abi3.so"]["role"] == "loaded"
    assert "sm_90a" in by["sgl_kernel/sm90/common_ops.abi3.so"]["sass"]
    assert by["torch/lib/libtorch_cuda.so"]["runs_on_arch"]
    assert r90["ok"], r90["failures"]
    r120 = audit.audit(target("sm120", env), cuobjdump, "test")
    sm100 = [b for b in r120["binaries"] if b["binary"].endswith("sm100/common_ops.abi3.so")][0]
    assert sm100["role"] == "loaded" and sm100["via"].startswith("SASS sm_120a")
    fa3 = [b for b in r120["binaries"] if b["binary"].endswith("flash_ops.abi3.so")][0]
    assert fa3["role"] == "on-demand" and not fa3["runs_on_arch"]  # FA3 has no Blackwell code
    assert r120["ok"] and r120["timing"]["listed"] == 0


@_mark
def test_audit_fails_when_the_loaded_object_is_not_extracted(cuobjdump, built, tmp_path):
    _, b = built
    venv = _fake_env(tmp_path, {"sgl_kernel/sm90/common_ops.abi3.so": b["sass90a_120a.so"]})
    r = audit.audit(target("sm120", venv), cuobjdump, "test", tmp_path / "c.json")
    assert [f["binary"] for f in r["failures"]] == ["sgl_kernel/sm100/common_ops.abi3.so"]
    assert "it is not on disk" in r["failures"][0]["why"]
    assert audit.audit(target("sm90", venv), cuobjdump, "test", tmp_path / "c.json")["ok"]
