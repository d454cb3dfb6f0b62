"""ktenv.doctor on recorded hosts (a real H100 machine, this CPU-only machine, a
constructed 3090 + 4090 workstation) and on this host itself."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ktenv import spec
from ktenv.check import doctor
from ktenv.host import facts as hostfacts, gpu

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "doctor"


@pytest.fixture(scope="module")
def envs():
    return spec.load(ROOT / "envs")


def report(envs, name, use_nvml=True, **env):
    facts = hostfacts.recorded_facts(FIX / name, use_nvml=use_nvml)
    facts.env.update(env)
    return doctor.collect(envs, facts)


def ids(r):
    return {p["id"]: p for p in r["problems"]}


def edited(tmp_path, name, file, old, new):
    """A copy of a recording with one deliberate change."""
    d = tmp_path / name
    shutil.copytree(FIX / name, d)
    text = (d / file).read_text()
    assert old in text
    (d / file).write_text(text.replace(old, new))
    return d


# --- the real H100 machine -----------------------------------------------------

def test_h100(envs):
    r = report(envs, "h100")
    assert r["gpu_source"] == "nvml"
    assert [(g["name"], g["compute_capability"], g["arch"]) for g in r["gpus"]] == [("NVIDIA H100 80GB HBM3", "9.0", "sm90")]
    assert r["arch"] == {"recommended": "sm90", "title": "Hopper (H100 / H200)", "gpus": [0], "tensor_parallel_size": 1}
    assert r["driver"] == {"version": "580.159.04", "cuda": "13.0", "needs_cuda": "12.8", "ok": True}
    assert r["cpu"]["model"] == "Intel(R) Xeon(R) Processor"
    assert r["cpu"]["isa"]["amx_tile"] and r["cpu"]["isa"]["avx512_bf16"]
    assert r["cpu"]["kt_kernel_variant"] == "amx"
    # lscpu on that machine: 1 thread per core, 16 cores, one NUMA node.
    assert r["numa"] == [{"node": 0, "logical_cpus": 16, "physical_cores": 16}]
    assert r["kt"] == {"cpuinfer": 15, "threadpool_count": 1}
    # 128 GiB of RAM and 64 GiB of disk: too small for the model, said so.
    p = ids(r)
    assert set(p) == {"memory", "disk"}
    assert p["memory"]["severity"] == "error" and "256 GiB" in p["memory"]["message"]
    assert p["disk"]["severity"] == "warning"
    assert r["ok"] is False
    text = doctor.render(r)
    assert "Use: --arch sm90 (Hopper (H100 / H200)) on GPU 0, --tensor-parallel-size 1" in text
    assert "kt-kernel variant: amx" in text
    assert "--kt-cpuinfer 15 --kt-threadpool-count 1" in text
    assert "GPU-eba33f83-f6ac-8a52-cfe3-1ddccdf154ff" in text


def test_h100_through_nvidia_smi_gives_the_same_answer(envs):
    a, b = report(envs, "h100"), report(envs, "h100", use_nvml=False)
    assert b["gpu_source"] == "nvidia-smi"
    assert a["arch"] == b["arch"] and a["driver"] == b["driver"]
    assert [g["uuid"] for g in a["gpus"]] == [g["uuid"] for g in b["gpus"]]


def test_four_gpus_warn_about_tp4(envs):
    facts = hostfacts.recorded_facts(FIX / "h100")
    one = facts.gpu.gpus[0]
    facts.gpu = gpu.GpuHost(tuple(gpu.Gpu(i, one.name, "9.0", one.memory_bytes, f"GPU-{i}") for i in range(4)),
                            facts.gpu.driver_version, facts.gpu.cuda_version, "nvml")
    r = doctor.collect(envs, facts)
    assert r["arch"]["tensor_parallel_size"] == 4
    assert "kvcache-ai/ktransformers#1998" in ids(r)["tp-size"]["message"]
    # One core per GPU rank stays free.
    assert r["kt"]["cpuinfer"] == 12


# --- this CPU-only machine (recorded) -------------------------------------------

def test_cpu_only(envs):
    r = report(envs, "cpu-only")
    assert r["gpus"] == [] and r["gpu_source"] == "none"
    assert r["arch"]["recommended"] is None
    p = ids(r)["no-gpu"]
    assert p["severity"] == "error"
    assert "No NVIDIA GPU was found on this host" in p["message"]
    assert "libnvidia-ml.so.1" in p["message"] and "nvidia-smi is not on PATH" in p["message"]
    assert "python build.py env --arch sm120" in p["remedy"]
    # The CPU side is still reported.
    assert r["cpu"]["kt_kernel_variant"]
    assert r["physical_cores"] >= 1
    text = doctor.render(r)
    assert "GPUs: none found" in text and "no --arch fits" in text


# --- the constructed 3090 + 4090 workstation -----------------------------------

def test_mixed_3090_4090(envs):
    r = report(envs, "mixed-3090-4090")
    assert [(g["index"], g["arch"], g["supported"]) for g in r["gpus"]] == [(0, "sm86", False), (1, "sm89", True)]
    assert r["arch"]["recommended"] == "sm89" and r["arch"]["gpus"] == [1]
    p = ids(r)
    mixed = p["mixed-arch"]
    assert mixed["severity"] == "error"
    assert "kvcache-ai/ktransformers#2039" in mixed["message"]
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1" in mixed["remedy"]
    assert "--arch sm89" in mixed["remedy"]
    assert p["unsupported-gpu-sm86"]["severity"] == "warning"
    assert "fp8e4nv" in p["unsupported-gpu-sm86"]["message"]
    # Hyper-threads counted apart: 64 logical CPUs are 32 cores.
    assert r["numa"] == [{"node": 0, "logical_cpus": 64, "physical_cores": 32}]
    assert r["kt"] == {"cpuinfer": 31, "threadpool_count": 1}
    # 251.5 GiB MemTotal is what a 256 GB machine shows: no memory problem.
    assert "memory" not in p and "disk" not in p
    assert r["cpu"]["kt_kernel_variant"] == "avx512_bf16"


def test_mixed_host_with_the_remedy_applied(envs):
    r = report(envs, "mixed-3090-4090", CUDA_VISIBLE_DEVICES="1", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    assert r["problems"] == [] and r["ok"] is True
    assert [g["visible"] for g in r["gpus"]] == [False, True]
    assert "(hidden by CUDA_VISIBLE_DEVICES)" in doctor.render(r)


def test_mixed_host_indices_without_pci_order_warn(envs):
    r = report(envs, "mixed-3090-4090", CUDA_VISIBLE_DEVICES="1")
    assert "fastest GPU first" in ids(r)["cuda-visible-devices"]["message"]


def test_only_an_unsupported_gpu(envs):
    r = report(envs, "mixed-3090-4090", CUDA_VISIBLE_DEVICES="0", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    p = ids(r)["unsupported-gpu-sm86"]
    assert p["severity"] == "error"
    assert "sm86 (Ampere (RTX 3090 / A6000 / A40)), which is not supported" in p["message"]
    assert r["arch"]["recommended"] is None and r["ok"] is False


def test_cuda_visible_devices_hides_everything(envs):
    r = report(envs, "mixed-3090-4090", CUDA_VISIBLE_DEVICES="")
    assert "hides every GPU (2 present)" in ids(r)["no-visible-gpu"]["message"]


def test_old_driver_is_a_problem_with_a_remedy(envs, tmp_path):
    d = edited(tmp_path, "mixed-3090-4090", "nvml.json", '"cuda_driver_version": 12080', '"cuda_driver_version": 12040')
    facts = hostfacts.recorded_facts(d)
    facts.env.update(CUDA_VISIBLE_DEVICES="1", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    r = doctor.collect(envs, facts)
    p = ids(r)["driver-too-old"]
    assert r["driver"]["ok"] is False
    assert "supports CUDA up to 12.4" in p["message"] and "CUDA 12.8" in p["message"]
    assert "Linux driver 570.26 or newer" in p["remedy"]


def test_old_driver_through_nvidia_smi(envs, tmp_path):
    d = edited(tmp_path, "mixed-3090-4090", "nvidia-smi.txt", "CUDA Version: 12.8", "CUDA Version: 12.2")
    r = doctor.collect(envs, hostfacts.recorded_facts(d, use_nvml=False))
    assert "supports CUDA up to 12.2" in ids(r)["driver-too-old"]["message"]


def test_unknown_compute_capability(envs, tmp_path):
    d = edited(tmp_path, "h100", "nvml.json", '"cc": [\n    9,\n    0\n   ]', '"cc": [7, 5]')
    r = doctor.collect(envs, hostfacts.recorded_facts(d))
    p = ids(r)["unsupported-gpu-cc7.5"]
    assert "compute capability 7.5, which no envs/*.toml describes" in p["message"]


def test_small_memory_is_an_error(envs, tmp_path):
    d = edited(tmp_path, "mixed-3090-4090", "meminfo", "MemTotal:       263732608 kB", "MemTotal:       197000000 kB")
    r = doctor.collect(envs, hostfacts.recorded_facts(d))
    assert "187.9 GiB of RAM" in ids(r)["memory"]["message"]


@pytest.mark.parametrize("cores,ranks,expect", [
    ([16], 1, (15, 1)),
    ([16, 16], 2, (30, 2)),
    ([16, 16], 8, (24, 2)),
    ([12, 10], 1, (18, 2)),  # no pool gets more threads than its smallest node has cores
    ([2], 8, (1, 1)),  # never zero threads
])
def test_kt_threads(cores, ranks, expect):
    nodes = [{"node": i, "logical_cpus": 2 * c, "physical_cores": c} for i, c in enumerate(cores)]
    assert hostfacts.kt_threads(nodes, ranks) == expect


# --- this host, for real -------------------------------------------------------

def test_record_then_replay_this_host(envs, tmp_path):
    """A recording of this machine replays to the same report as reading it live."""
    hostfacts.record(tmp_path / "me")
    live = doctor.collect(envs, hostfacts.live_facts())
    replay = doctor.collect(envs, hostfacts.recorded_facts(tmp_path / "me"))
    for key in ("gpus", "gpu_source", "arch", "driver", "cpu", "numa", "kt", "memory"):
        assert live[key] == replay[key], key


def test_doctor_cli_on_this_host():
    env = {k: v for k, v in os.environ.items() if k != "KTENV_HOST_RECORDING"}
    human = subprocess.run([sys.executable, "build.py", "doctor"], cwd=ROOT, capture_output=True, text=True, env=env)
    js = subprocess.run([sys.executable, "build.py", "doctor", "--json"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert "Traceback" not in human.stderr + js.stderr
    r = json.loads(js.stdout)
    assert "CPU:" in human.stdout and "NUMA:" in human.stdout
    if r["gpus"]:
        pytest.skip("this host has a GPU; the no-GPU answer is checked on the cpu-only recording")
    assert human.returncode == 1 and js.returncode == 1
    assert "No NVIDIA GPU was found on this host" in human.stdout
    assert r["problems"][0]["id"] == "no-gpu"


def test_doctor_cli_replays_a_recording():
    env = {**os.environ, "KTENV_HOST_RECORDING": str(FIX / "h100")}
    p = subprocess.run([sys.executable, "build.py", "doctor", "--json"], cwd=ROOT, capture_output=True, text=True, env=env)
    r = json.loads(p.stdout)
    assert r["origin"] == f"recording {FIX / 'h100'}"
    assert r["arch"]["recommended"] == "sm90"


def test_kt_kernel_variant_above_the_cpu_is_an_error(envs):
    r = report(envs, "mixed-3090-4090", KT_KERNEL_CPU_VARIANT="amx", CUDA_VISIBLE_DEVICES="1", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    p = ids(r)["kt-kernel-variant"]
    assert "SIGILL" in p["message"] and "amx" in p["message"]
    assert "unset KT_KERNEL_CPU_VARIANT" in p["remedy"]


def test_kt_kernel_variant_forced_below_is_reported(envs):
    r = report(envs, "h100", KT_KERNEL_CPU_VARIANT="avx2")
    assert r["cpu"]["kt_kernel_variant_forced"] == "avx2"
    assert "KT_KERNEL_CPU_VARIANT forces avx2" in doctor.render(r)


def test_two_supported_archs_pick_the_larger_group(envs):
    """4090 + 2x 5090: both archs are supported, but one server cannot span them."""
    facts = hostfacts.recorded_facts(FIX / "mixed-3090-4090")
    facts.gpu = gpu.GpuHost((
        gpu.Gpu(0, "NVIDIA GeForce RTX 4090", "8.9", 24564 * 2**20, "GPU-a"),
        gpu.Gpu(1, "NVIDIA GeForce RTX 5090", "12.0", 32607 * 2**20, "GPU-b"),
        gpu.Gpu(2, "NVIDIA GeForce RTX 5090", "12.0", 32607 * 2**20, "GPU-c"),
    ), "575.57.08", "12.9", "nvml")
    r = doctor.collect(envs, facts)
    assert r["arch"]["recommended"] == "sm120" and r["arch"]["tensor_parallel_size"] == 2
    assert "CUDA_VISIBLE_DEVICES=1,2" in ids(r)["mixed-arch"]["remedy"]
    assert r["kt"]["cpuinfer"] == 30


def test_cpu_without_avx2_is_an_error(envs, tmp_path):
    d = tmp_path / "old"
    shutil.copytree(FIX / "cpu-only", d)
    text = (d / "cpuinfo").read_text()
    (d / "cpuinfo").write_text(text.replace(" avx2 ", " ").replace(" avx512f ", " ").replace(" fma ", " "))
    r = doctor.collect(envs, hostfacts.recorded_facts(d))
    assert r["cpu"]["kt_kernel_variant"] is None
    assert "lacks AVX2" in ids(r)["cpu-isa"]["message"]
    assert "kt-kernel variant: none (needs AVX2)" in doctor.render(r)
