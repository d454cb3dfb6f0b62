"""ktenv.launch: golden dry-run commands per arch on recorded hosts, the
DeepSeek-V4 env rules, bad input, and a real exec."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ktenv import spec
from ktenv.host import facts as hostfacts
from ktenv.host import gpu
from ktenv.serve import launch
from ktenv.errors import KtenvError, SpecError
from ktenv.serve import model as modelmod
from ktenv.tools import uv_bin

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "doctor"
GOLDEN = FIX / "launch"
MODEL = "/models/DeepSeek-V4-Flash"
# DeepSeek-V4-Flash's config.json (sglang-kt's own copy of the shape; see tests/fixtures/models/README.md).
V4_FLASH = modelmod.read(ROOT / "tests" / "fixtures" / "models" / "deepseek-v4-flash")
UPDATE = os.environ.get("KTENV_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def envs():
    return spec.load(ROOT / "envs")


def facts(name):
    return hostfacts.recorded_facts(FIX / name)


def eight_5090():
    """The tutorial's validated box: 8x RTX 5090 (cc 12.0) on the Threadripper recording's CPU."""
    f = facts("mixed-3090-4090")
    f.gpu = gpu.GpuHost(
        tuple(gpu.Gpu(i, "NVIDIA GeForce RTX 5090", "12.0", 32607 * 2**20, f"GPU-5090000{i}-0000-0000-0000-000000000000")
              for i in range(8)),
        "575.57.08", "12.9", "nvml")
    return f


# (golden name, arch, host facts, require_gpu)
CASES = {
    "sm90-h100": ("sm90", lambda: facts("h100"), True),
    "sm89-mixed-3090-4090": ("sm89", lambda: facts("mixed-3090-4090"), True),
    "sm120-8x5090": ("sm120", eight_5090, True),
    "sm100-cpu-only-dry-run": ("sm100", lambda: facts("cpu-only"), False),
}


def build(envs, case, **kw):
    arch, make, require = CASES[case]
    kw.setdefault("user_env", {})
    kw.setdefault("numactl", "numactl")
    kw.setdefault("model_facts", V4_FLASH)
    return launch.build_command(envs, arch, make(), model=MODEL, python=f"/opt/ktenv/.envs/{arch}/bin/python",
                                require_gpu=require, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_dry_run(envs, case):
    cmd = build(envs, case)
    text = cmd.shell() + "".join(f"# note: {n}\n" for n in cmd.notes)
    path = GOLDEN / f"{case}.sh"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"dry-run output changed; if intended, rerun with KTENV_UPDATE_GOLDEN=1 and review {path}"


def test_golden_facts(envs):
    """What the goldens must show, spelled out (so a regenerated golden cannot drift silently)."""
    h100 = build(envs, "sm90-h100")
    assert h100.env == {"SGLANG_DSV4_MODE": "2604", "SGLANG_DSV4_2604_SUBMODE": "2604B",
                        "FLASHINFER_CUDA_ARCH_LIST": "9.0a", "TORCH_CUDA_ARCH_LIST": "9.0a"}
    a = h100.server_args
    assert a[a.index("--tensor-parallel-size") + 1] == "1"
    assert a[a.index("--kt-cpuinfer") + 1] == "15"  # 16 physical cores, one for the GPU rank
    assert a[a.index("--kt-threadpool-count") + 1] == "1"
    # Sized for one 80 GB H100 (tests/test_sizing.py pins the rule): graphs for batch 1, 2 requests.
    assert a[a.index("--cuda-graph-bs") + 1: a.index("--cuda-graph-max-bs")] == ["1"]
    assert a[a.index("--max-running-requests") + 1] == "2" and a[a.index("--mem-fraction-static") + 1] == "0.90"
    # One GPU: EAGLE left out (net-negative on one CPU-bound GPU upstream; envs/serve.toml speculative_min_gpus).
    assert "--kt-enable-dynamic-expert-update" in a and "--speculative-algorithm" not in a
    assert h100.numactl == ["numactl", "--interleave=all"]

    mixed = build(envs, "sm89-mixed-3090-4090")
    assert mixed.env["CUDA_VISIBLE_DEVICES"] == "1" and mixed.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert mixed.env["TORCH_CUDA_ARCH_LIST"] == "8.9"
    assert any("#2039" in n for n in mixed.notes)
    a = mixed.server_args
    assert a[a.index("--kt-cpuinfer") + 1] == "31"  # 32 cores of 64 hyper-threads

    b = build(envs, "sm120-8x5090").server_args
    assert b[b.index("--tensor-parallel-size") + 1] == "8"
    assert b[b.index("--cuda-graph-bs") + 1: b.index("--cuda-graph-max-bs")] == ["1", "2", "4"]
    assert b[b.index("--mem-fraction-static") + 1] == "0.80" and b[b.index("--max-total-tokens") + 1] == "32768"
    assert b[b.index("--kt-cpuinfer") + 1] == "24"  # 32 cores, one per GPU rank left free

    cpu = build(envs, "sm100-cpu-only-dry-run")
    assert cpu.server_args[cpu.server_args.index("--tensor-parallel-size") + 1] == "1"
    assert any("No visible GPU of arch sm100" in n for n in cpu.notes)


@pytest.fixture(scope="module")
def sglang_parse(stack_python):
    """Parse argv lists with the real sglang-kt ServerArgs parser (one process for all)."""
    py = stack_python
    script = (
        "import argparse, json, sys\n"
        "from sglang.srt.server_args import ServerArgs\n"
        "out = []\n"
        "for argv in json.load(sys.stdin):\n"
        "    p = argparse.ArgumentParser(); ServerArgs.add_cli_args(p)\n"
        "    a = vars(p.parse_args(argv))\n"
        "    out.append({k: a.get(k) for k in ('model_path', 'kt_weight_path', 'kt_cpuinfer', 'kt_threadpool_count',\n"
        "        'tensor_parallel_size', 'kt_method', 'cuda_graph_bs', 'speculative_algorithm', 'port',\n"
        "        'kt_enable_dynamic_expert_update', 'disable_shared_experts_fusion', 'mem_fraction_static')})\n"
        "print('KTENV_PARSED ' + json.dumps(out))\n"
    )

    def parse(argvs):
        p = subprocess.run([str(py), "-c", script], input=json.dumps(argvs), capture_output=True, text=True, timeout=300)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("KTENV_PARSED ")]
        assert line, p.stderr[-3000:]
        return json.loads(line[0].split(" ", 1)[1])
    return parse


def test_real_sglang_parser_accepts_every_golden(envs, sglang_parse):
    cmds = {c: build(envs, c) for c in sorted(CASES)}
    extra = build(envs, "sm90-h100", speculative=False, extra=["--", "--tp", "1", "--port", "31000"])
    parsed = sglang_parse([c.server_args for c in cmds.values()] + [extra.server_args])
    for (case, cmd), got in zip(cmds.items(), parsed):
        a = cmd.server_args
        assert got["model_path"] == MODEL and got["kt_weight_path"] == MODEL
        assert got["kt_cpuinfer"] == int(a[a.index("--kt-cpuinfer") + 1])
        assert got["tensor_parallel_size"] == int(a[a.index("--tensor-parallel-size") + 1])
        bs = a[a.index("--cuda-graph-bs") + 1: a.index("--cuda-graph-max-bs")]
        assert got["kt_method"] == "MXFP4" and got["cuda_graph_bs"] == [int(x) for x in bs]
        assert got["kt_enable_dynamic_expert_update"] is True and got["disable_shared_experts_fusion"] is True
        assert got["mem_fraction_static"] == float(a[a.index("--mem-fraction-static") + 1])
        assert got["speculative_algorithm"] == ("EAGLE" if "--speculative-algorithm" in a else None)
    assert parsed[-1]["port"] == 31000 and parsed[-1]["speculative_algorithm"] is None


# --- flags ---------------------------------------------------------------------

def test_profile_args_toml_types():
    assert launch.profile_args({"a": True, "b": False, "c": [1, 2], "d": 0.8, "e": "x"}) == [
        ["--a"], ["--c", "1", "2"], ["--d", "0.8"], ["--e", "x"]]


def test_no_speculative(envs):
    a = build(envs, "sm90-h100", speculative=False).server_args
    assert not [t for t in a if t.startswith("--speculative")]


def test_extra_flags_replace_generated_ones(envs):
    cmd = build(envs, "sm90-h100", extra=["--", "--tp-size", "2", "--kt-cpuinfer=8", "--enable-mixed-chunk"])
    a = cmd.server_args
    assert "--tensor-parallel-size" not in a and a[a.index("--tp-size") + 1] == "2"
    assert "--kt-cpuinfer" not in a and "--kt-cpuinfer=8" in a
    assert a[-1] == "--enable-mixed-chunk"


def test_kt_weight_path(envs):
    a = build(envs, "sm90-h100", kt_weight_path="/fast/experts").server_args
    assert a[a.index("--kt-weight-path") + 1] == "/fast/experts"


def test_shell_quoting(envs):
    arch, make, _ = CASES["sm90-h100"]
    cmd = launch.build_command(envs, arch, make(), model="/models/my model", python="/p/bin/python",
                               numactl="numactl", user_env={})
    assert "--model '/models/my model'" in cmd.shell()


# --- DeepSeek-V4 env rules (reused by smoke) ---------------------------------------

MX = ["--kt-method", "MXFP4"]


@pytest.mark.parametrize("env,args,fragment", [
    ({}, MX, "SGLANG_DSV4_MODE is ''"),
    ({"SGLANG_DSV4_MODE": "2605"}, MX, "SGLANG_DSV4_MODE is '2605'"),
    ({"SGLANG_DSV4_MODE": "2604"}, MX, "SGLANG_DSV4_2604_SUBMODE is '' with SGLANG_DSV4_MODE=2604"),
    ({"SGLANG_DSV4_MODE": "2601", "SGLANG_DSV4_2604_SUBMODE": "2604B"}, MX, "it is '' for that mode"),
    ({"SGLANG_DSV4_MODE": "2604", "SGLANG_DSV4_2604_SUBMODE": "2604B"}, ["--kt-method", "AMXINT8"], "needs --kt-method MXFP4"),
    ({"SGLANG_DSV4_MODE": "2604", "SGLANG_DSV4_2604_SUBMODE": "2604B"}, [], "unset: sglang defaults to AMXINT4"),
])
def test_dsv4_env_rules_refuse(env, args, fragment):
    problems = launch.dsv4_env_problems(env, args)
    assert any(fragment in p for p in problems), problems
    with pytest.raises(KtenvError, match="SGLANG_DSV4"):
        launch.check_dsv4_env(env, args)


@pytest.mark.parametrize("env,args", [
    ({"SGLANG_DSV4_MODE": "2604", "SGLANG_DSV4_2604_SUBMODE": "2604B"}, MX),
    ({"SGLANG_DSV4_MODE": "2604", "SGLANG_DSV4_2604_SUBMODE": "2604B"}, ["--kt-method=mxfp4"]),
    ({"SGLANG_DSV4_MODE": "2604", "SGLANG_DSV4_2604_SUBMODE": "2604A"}, ["--kt-method", "AMXINT4"]),
    # sglang-kt 0.7.2 zeroes the clamp for AMXINT4 itself (kt_ep_wrapper._kt_supports_swiglu_parameters).
    ({"SGLANG_DSV4_MODE": "2604", "SGLANG_DSV4_2604_SUBMODE": "2604B"}, ["--kt-method", "AMXINT4"]),
    ({"SGLANG_DSV4_MODE": "2601"}, []),
])
def test_dsv4_env_rules_accept(env, args):
    assert launch.dsv4_env_problems(env, args) == []


def test_user_dsv4_mode_wins_and_is_checked(envs):
    with pytest.raises(KtenvError, match="SGLANG_DSV4_2604_SUBMODE is '2604B' with SGLANG_DSV4_MODE=2601"):
        build(envs, "sm90-h100", user_env={"SGLANG_DSV4_MODE": "2601"})
    cmd = build(envs, "sm90-h100", user_env={"SGLANG_DSV4_MODE": "2601", "SGLANG_DSV4_2604_SUBMODE": ""})
    assert cmd.env["SGLANG_DSV4_MODE"] == "2601"
    assert "SGLANG_DSV4_2604_SUBMODE='' " in cmd.shell()


def test_kt_method_from_extra_flags_is_checked(envs):
    with pytest.raises(KtenvError, match="needs --kt-method MXFP4"):
        build(envs, "sm90-h100", extra=["--", "--kt-method", "AMXINT8"])


def test_leftover_arch_list_in_the_environment_does_not_win(envs):
    # Seen on the H100 machine: TORCH_CUDA_ARCH_LIST=9.0a exported by its image.
    cmd = build(envs, "sm120-8x5090", user_env={"TORCH_CUDA_ARCH_LIST": "9.0a"})
    assert cmd.env["TORCH_CUDA_ARCH_LIST"] == "12.0+PTX"
    assert any("TORCH_CUDA_ARCH_LIST=9.0a" in n for n in cmd.notes)


def test_forced_kt_variant_above_the_cpu_is_refused(envs):
    with pytest.raises(KtenvError, match="SIGILL"):
        build(envs, "sm89-mixed-3090-4090", user_env={"KT_KERNEL_CPU_VARIANT": "amx"})


# --- the host ----------------------------------------------------------------------

def test_no_gpu_of_the_arch_is_refused_without_dry_run(envs):
    with pytest.raises(KtenvError, match=r"No visible GPU of arch sm120 .*visible GPUs: 0 NVIDIA H100 80GB HBM3 \(cc 9.0\).*--dry-run"):
        launch.build_command(envs, "sm120", facts("h100"), model=MODEL, python="/p", user_env={})


def test_user_visible_devices_mixing_archs_is_refused(envs):
    with pytest.raises(KtenvError, match="CUDA_VISIBLE_DEVICES shows GPUs of other archs .*#2039"):
        build(envs, "sm89-mixed-3090-4090", user_env={"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})


def test_numactl_missing(envs, tmp_path):
    one_node = build(envs, "sm90-h100", numactl=None)
    assert one_node.numactl == [] and any("numactl is not installed" in n for n in one_node.notes)
    f = facts("mixed-3090-4090")
    # Two NUMA nodes of 16 cores each (the recording's sysfs, split).
    f.sysfs_root = str(_two_nodes(Path(f.sysfs_root), tmp_path))
    with pytest.raises(KtenvError, match="numactl is not installed, and this host has 2 NUMA nodes"):
        launch.build_command(envs, "sm89", f, model=MODEL, python="/p", numactl=None, user_env={})
    cmd = launch.build_command(envs, "sm89", f, model=MODEL, python="/p", numactl="numactl", user_env={})
    a = cmd.server_args
    assert a[a.index("--kt-threadpool-count") + 1] == "2" and a[a.index("--kt-cpuinfer") + 1] == "30"


def _two_nodes(sysfs: Path, tmp: Path) -> Path:
    d = tmp / "sys"
    shutil.copytree(sysfs, d)
    node = d / "devices/system/node"
    (node / "node0/cpulist").write_text("0-15,32-47\n")
    (node / "node1").mkdir()
    (node / "node1/cpulist").write_text("16-31,48-63\n")
    return d


# --- the launch command: bad input and exec ------------------------------------------

def run(arch="sm90", model=None, kt_weight_path=None, dry_run=True, prefix=None):
    """`build.py launch --arch ... --model ... [--dry-run]` in-process; KtenvErrors propagate."""
    from ktenv import target

    t = target.resolve(spec.load(ROOT / "envs"), arch, lock_root=ROOT / "lock", prefix=prefix)
    return launch.command_for(t, model, kt_weight_path=kt_weight_path, dry_run=dry_run)


@pytest.fixture
def model(tmp_path):
    m = tmp_path / "DeepSeek-V4-Flash"
    m.mkdir()
    (m / "config.json").write_text("{}")
    return m


def test_missing_model_path(tmp_path):
    with pytest.raises(KtenvError, match=r"--model .*nope: no such directory.*huggingface-cli download"):
        run(model=str(tmp_path / "nope"))


def test_model_without_config(tmp_path):
    with pytest.raises(KtenvError, match="has no config.json"):
        run(model=str(tmp_path))


def test_missing_kt_weight_path(model, tmp_path):
    with pytest.raises(KtenvError, match="--kt-weight-path .*: no such directory"):
        run(model=str(model), kt_weight_path=str(tmp_path / "nope"))


def test_unknown_arch(model):
    with pytest.raises(SpecError, match=r"Unknown arch 'sm75'\. Supported archs are") as e:
        run(arch="sm75", model=str(model))
    assert all(a in str(e.value) for a in ("sm89", "sm90", "sm100", "sm120")) and "sm80" not in str(e.value)


@pytest.mark.parametrize("arch", ["sm80", "sm86"])
def test_ampere_is_refused_with_the_reason(model, arch):
    with pytest.raises(SpecError, match=r"is not supported\. .*fp8e4nv not supported") as e:
        run(arch=arch, model=str(model))
    assert e.value.exit_code == 3


def test_env_must_exist_without_dry_run(model, tmp_path):
    with pytest.raises(KtenvError, match=r"There is no environment for sm90 at .*Build it first: python build.py env --arch sm90 --prefix"):
        run(model=str(model), dry_run=False, prefix=str(tmp_path / "env"))


def _cli(argv, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_DSV4", "CUDA_", "KT_KERNEL", "KTENV_"))}
    full.update(env)
    return subprocess.run([sys.executable, "build.py", *argv], cwd=ROOT, capture_output=True, text=True, env=full, timeout=600)


def test_cli_dry_run_on_this_host(model, tmp_path):
    # A prefix with no env in it (.ci/run builds .envs/sm120 before the tests; this is about a missing one).
    absent = tmp_path / "no-env"
    p = _cli(["launch", "--arch", "sm120", "--model", str(model), "--prefix", str(absent), "--dry-run", "--", "--port", "31000"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("env SGLANG_DSV4_MODE=2604 SGLANG_DSV4_2604_SUBMODE=2604B FLASHINFER_CUDA_ARCH_LIST=12.0a")
    assert f"--model {model}" in p.stdout and "--port 31000" in p.stdout and "--port 30000" not in p.stdout
    assert "python build.py env --arch sm120" in p.stderr  # the dry run says the env is missing, and how to build it


def test_cli_bad_input_exit_codes(model):
    p = _cli(["launch", "--arch", "sm80", "--model", str(model), "--dry-run"])
    assert p.returncode == 3 and p.stderr.startswith("error: sm80 (Ampere (A100 / A30)) is not supported.")
    p = _cli(["launch", "--arch", "sm90", "--model", "/nonexistent/model", "--dry-run"])
    assert p.returncode == 2 and "no such directory" in p.stderr


def _shim_env(tmp_path) -> Path:
    """A real venv whose `sglang.launch_server` records how it was started."""
    uv = uv_bin()
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "sglang").mkdir()
    (site / "sglang/__init__.py").write_text("")
    (site / "sglang/launch_server.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'exe': sys.executable,\n"
        "           'env': {k: v for k, v in os.environ.items() if k.startswith(('SGLANG_', 'TORCH_', 'FLASHINFER_', 'CUDA_'))}},\n"
        "          open(os.environ['SHIM_OUT'], 'w'))\n")
    return venv


def test_exec_replaces_ktenv_with_the_env_python(model, tmp_path):
    venv = _shim_env(tmp_path)
    # What `build.py env --flash-mla-source` records: this stand-in env has flash_mla (sm90 needs it).
    (venv / "ktenv-stamp.json").write_text(json.dumps({"arch": "sm90", "flash_mla": {"path": "source"}}))
    out = tmp_path / "started.json"
    p = _cli(["launch", "--arch", "sm90", "--model", str(model), "--prefix", str(venv), "--no-speculative"],
             KTENV_HOST_RECORDING=str(FIX / "h100"), SHIM_OUT=str(out), PATH=os.environ["PATH"])
    assert p.returncode == 0, p.stderr
    started = json.loads(out.read_text())
    assert Path(started["exe"]).parent == venv / "bin"
    assert started["argv"][started["argv"].index("--kt-cpuinfer") + 1] == "15"
    assert "--speculative-algorithm" not in started["argv"]
    assert started["env"]["SGLANG_DSV4_MODE"] == "2604" and started["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    assert "Host facts come from recording" in p.stderr


def test_sm90_without_flash_mla_is_refused_before_the_server_starts(model, stack_env):
    """Hopper needs flash_mla (no fallback): launch says so instead of a server dying at its first forward."""
    p = _cli(["launch", "--arch", "sm90", "--model", str(model), "--prefix", str(stack_env)],
             KTENV_HOST_RECORDING=str(FIX / "h100"), PATH=os.environ["PATH"])
    assert p.returncode == 2 and "flash_mla" in p.stderr and "--flash-mla-source" in p.stderr, p.stderr[-2000:]
    assert "in prepare_server_args" not in p.stderr  # refused before sglang was started


def test_exec_real_sglang_server_starts(model, tmp_path, sm89_env):
    """The real sglang-kt 0.7.2 launch_server, exec'd by ktenv, gets as far as this GPU-less host allows
    (sm89, on a recorded host with an RTX 4090 beside a 3090)."""
    p = _cli(["launch", "--arch", "sm89", "--model", str(model), "--prefix", str(sm89_env)],
             KTENV_HOST_RECORDING=str(FIX / "mixed-3090-4090"), PATH=os.environ["PATH"])
    assert p.returncode != 0
    # sglang parsed every flag and stopped only at the missing GPU.
    assert "in prepare_server_args" in p.stderr, p.stderr[-2000:]
    assert "No accelerator (CUDA, XPU, HPU, NPU, MUSA) is available." in p.stderr


def test_mixed_supported_archs_get_their_own_gpus(envs):
    f = facts("mixed-3090-4090")
    f.gpu = gpu.GpuHost((
        gpu.Gpu(0, "NVIDIA GeForce RTX 4090", "8.9", 24564 * 2**20, "GPU-a"),
        gpu.Gpu(1, "NVIDIA GeForce RTX 5090", "12.0", 32607 * 2**20, "GPU-b"),
        gpu.Gpu(2, "NVIDIA GeForce RTX 5090", "12.0", 32607 * 2**20, "GPU-c"),
    ), "575.57.08", "12.9", "nvml")
    cmd = launch.build_command(envs, "sm89", f, model=MODEL, python="/p", numactl="numactl", user_env={})
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "0"
    cmd = launch.build_command(envs, "sm120", f, model=MODEL, python="/p", numactl="numactl", user_env={})
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert cmd.server_args[cmd.server_args.index("--tensor-parallel-size") + 1] == "2"
