"""ktenv.serve.convert + amxint4: kt-kernel's AMXINT4 conversion, run for real on a tiny DeepSeek-V4 checkpoint.

Needs the real stack env (conftest's stack_env) and a ktransformers
checkout in KTENV_KT_SOURCE (the script is in no wheel): `fetch` or clone
github.com/kvcache-ai/ktransformers; only kt-kernel/scripts/ is read. The tiny
checkpoint comes from the smoke tier's generator (ktenv/probes/smoke_tiny_model.py).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ktenv import spec, target
from ktenv.errors import KtenvError
from ktenv.host import facts as hostfacts
from ktenv.progress import Progress
from ktenv.serve import amxint4, convert, launch
from ktenv.serve import model as modelmod

ROOT = Path(__file__).resolve().parents[2]
KT_SOURCE = os.environ.get("KTENV_KT_SOURCE")
SCRIPT = "kt-kernel/scripts/convert_cpu_weights_ds4.py"
H100 = ROOT / "tests" / "fixtures" / "doctor" / "h100"
needs_source = pytest.mark.skipif(not (KT_SOURCE and (Path(KT_SOURCE) / SCRIPT).is_file()),
                                  reason=f"KTENV_KT_SOURCE does not name a ktransformers checkout with {SCRIPT} "
                                         "(the script ships in no wheel; fetch or clone kvcache-ai/ktransformers)")
SHAPE = dict(layers=3, experts=16, hidden=512, intermediate=256)


@pytest.fixture(scope="module")
def envs():
    return spec.load(ROOT / "envs")


@pytest.fixture(scope="module")
def env_target(envs, stack_env):
    return target.resolve(envs, "sm90", lock_root=ROOT / "lock", prefix=stack_env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stack_python):
    """A DeepSeek-V4-shaped checkpoint with random MXFP4 experts, written by the smoke tier's generator."""
    out = tmp_path_factory.mktemp("tiny") / "DeepSeek-V4-tiny"
    args = [f"--{k}={v}" for k, v in SHAPE.items()]
    p = subprocess.run([str(stack_python), str(ROOT / "ktenv/probes/smoke_tiny_model.py"), str(out), *args],
                       capture_output=True, text=True, timeout=900)
    report = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("KTENV-RESULT ")][-1].split(" ", 1)[1])
    assert report["ok"], report
    return out


def _convert(env_target, tiny, out, pools=2, **kw):
    return convert.convert(env_target, str(tiny), str(out), KT_SOURCE, facts=hostfacts.recorded_facts(H100),
                           pools=pools, threads=2, progress=Progress(quiet=True), **kw)


@pytest.fixture(scope="module")
def converted(env_target, tiny, tmp_path_factory):
    """One real conversion for two threadpool slots (the H100 recording has one NUMA node: launch must follow the weights)."""
    if not (KT_SOURCE and (Path(KT_SOURCE) / SCRIPT).is_file()):
        pytest.skip("KTENV_KT_SOURCE does not name a ktransformers checkout")
    out = tmp_path_factory.mktemp("conv") / "tiny-AMXINT4"
    return out, _convert(env_target, tiny, out)


@pytest.mark.slow
@needs_source
def test_conversion_runs_and_is_checked(converted, tiny):
    out, man = converted
    assert man["method"] == "AMXINT4" and man["threadpool_count"] == 2 and man["format"] == "kt"
    assert (out / amxint4.MANIFEST).is_file() and not list(out.parent.glob(f".{out.name}.ktenv-partial-*"))
    # Every layer, both slots, three projections x (quant, scale) x 16 experts.
    assert man["layout"]["files"] == 3 * 2 * 3 * 2 * 16
    names = {p.name for p in (out / "_layer_2" / "_numa_1").iterdir()}
    assert "INT4_down_15_32768Byte_quant_.kt" in names and "INT4_down_15_2048Byte_scale_.kt" in names
    # kt-kernel's AMXInt4_MOE on this CPU against the torch INT4 emulation: ~2 %; against MXFP4: ~30 % (lossy).
    for c in man["check"]["cases"]:
        assert c["rel_l1_vs_int4_emulation"] < man["check"]["tolerance"] and c["finite"]
        assert 0.15 < c["rel_l1_vs_mxfp4"] < 0.5
    # This machine has no NVIDIA driver: the pin_memory workaround must have been used and said so.
    if not hostfacts.live_facts().gpu.gpus:
        assert man["pin_memory_workaround"]["active"] and man["pin_memory_workaround"]["pinned_requests_dropped"] > 0


@pytest.mark.slow
@needs_source
def test_rerun_is_a_no_op_and_other_outputs_are_refused(converted, env_target, tiny, tmp_path):
    out, man = converted
    assert _convert(env_target, tiny, out)["reused"] is True
    with pytest.raises(KtenvError, match="converted for 2 threadpool slot\\(s\\), not 1"):
        _convert(env_target, tiny, out, pools=1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(KtenvError, match="is not empty and holds no ktenv conversion"):
        _convert(env_target, tiny, busy)
    assert (busy / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@needs_source
def test_the_check_fails_on_broken_output(converted, tiny, tmp_path, stack_python):
    out, man = converted
    m = modelmod.read(tiny)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    victim = next((bad / "_layer_1" / "_numa_0").glob("INT4_up_3_*quant_.kt"))
    victim.write_bytes(victim.read_bytes()[:-10])
    (next((bad / "_layer_2" / "_numa_1").glob("INT4_gate_7_*scale_.kt"))).unlink()
    problems = amxint4.check_layout(bad, m, 2)["problems"]
    assert any("INT4_up_3_32768Byte_quant_.kt: 32758 bytes, expected 32768" in p for p in problems), problems
    assert any("layer 2 slot 1 lacks 1 file(s), e.g. gate/scale of expert 7" in p for p in problems), problems
    assert any("threadpool slots" in p for p in amxint4.check_layout(out, m, 1)["problems"])
    # Numerically: the next layer's files loaded in place of layer 0 are far from its INT4 emulation.
    p = subprocess.run([str(stack_python), str(ROOT / "ktenv/probes/convert_probe.py"), "check", str(tiny), str(out),
                        "--layer", "0", "--threadpool", "2", "--threads", "1", "--corrupt", "swap"],
                       capture_output=True, text=True, timeout=600)
    r = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("KTENV-RESULT ")][-1].split(" ", 1)[1])
    assert r["ok"] and min(c["rel_l1_vs_int4_emulation"] for c in r["cases"]) > 10 * man["check"]["tolerance"]


@pytest.mark.slow
@needs_source
def test_interrupted_conversion_leaves_nothing_and_is_cleaned(env_target, tiny, tmp_path):
    out = tmp_path / "q"
    leftover = tmp_path / ".q.ktenv-partial-999999999"
    (leftover / "_layer_0").mkdir(parents=True)
    with pytest.raises(KtenvError, match="does not exist. --kt-source must be a ktransformers checkout"):
        convert.convert(env_target, str(tiny), str(out), str(tmp_path / "no-checkout"),
                        facts=hostfacts.recorded_facts(H100), progress=Progress(quiet=True))
    broken = tmp_path / "ktransformers"
    (broken / SCRIPT).parent.mkdir(parents=True)
    (broken / SCRIPT).write_text("import sys\nprint('Processing layer 0 (1/3)...')\nsys.exit(3)\n")
    with pytest.raises(KtenvError, match=r"convert_cpu_weights_ds4.py failed \(exit 3\)"):
        convert.convert(env_target, str(tiny), str(out), str(broken),
                        facts=hostfacts.recorded_facts(H100), progress=Progress(quiet=True))
    assert not leftover.exists() and not out.exists()
    assert not list(tmp_path.glob(".q.ktenv-partial-*"))


@pytest.mark.slow
@needs_source
def test_launch_picks_amxint4_and_the_conversions_threadpool_count(converted, envs, tiny):
    out, man = converted
    facts = hostfacts.recorded_facts(H100)  # one NUMA node, 16 cores
    kw = dict(model=str(tiny), python="/p", numactl="numactl", user_env={}, kt_weight_path=str(out),
              model_facts=modelmod.read(tiny), kt_manifest=man)
    cmd = launch.build_command(envs, "sm90", facts, **kw)
    a = cmd.server_args
    assert a[a.index("--kt-method") + 1] == "AMXINT4" and a[a.index("--kt-threadpool-count") + 1] == "2"
    assert int(a[a.index("--kt-cpuinfer") + 1]) % 2 == 0
    assert a[a.index("--kt-gpu-prefill-token-threshold") + 1] == "0"
    assert cmd.env["SGLANG_DSV4_2604_SUBMODE"] == "2604B"  # the checkpoint's submode; sglang zeroes the CPU clamp
    text = " ".join(cmd.notes)
    assert "AMXINT4 is lossy" in text and "drops DeepSeek-V4's SwiGLU clamp" in text
    assert "Decode does not get faster" in text and "converted for 2 threadpool slot(s)" in text
    with pytest.raises(KtenvError, match="--kt-threadpool-count 1 does not match the 2 threadpool slot"):
        launch.build_command(envs, "sm90", facts, extra=["--", "--kt-threadpool-count", "1"], **kw)
    with pytest.raises(KtenvError, match="asks for --kt-method MXFP4"):
        amxint4.check_method({"kt-method": ["MXFP4"]}, man, str(out))


def test_amxint4_without_a_conversion_is_refused(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((ROOT / "tests/fixtures/models/deepseek-v4-flash/config.json").read_text())
    t = target.resolve(spec.load(ROOT / "envs"), "sm90", lock_root=ROOT / "lock", prefix=tmp_path / "env")
    with pytest.raises(KtenvError, match="has no ktenv conversion .*python build.py convert"):
        launch.command_for(t, str(model), dry_run=True, facts=hostfacts.recorded_facts(H100),
                           extra=["--kt-method", "AMXINT4"])


def test_cli_convert_refuses_a_missing_checkout(cli, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((ROOT / "tests/fixtures/models/deepseek-v4-flash/config.json").read_text())
    p = cli("convert", "--arch", "sm90", "--model", str(model), "--output", str(tmp_path / "out"),
            "--kt-source", str(tmp_path / "nowhere"), "--prefix", str(tmp_path / "env"))
    assert p.returncode == 2 and p.stderr.startswith("error: ")
    assert "no environment for sm90" in p.stderr or "--kt-source must be a ktransformers checkout" in p.stderr
