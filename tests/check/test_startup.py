"""server-args tier and the launch-gpu start command (ktenv/check/startup.py, probes/dsv4_fields.py,
probes/smoke_server_args.py).

The fast tests need no env: the DeepSeek-V4 field table on V4-Flash's config
values and on broken copies, and the tiny start's command built for recorded
hosts (the real H100 recording, and the same host with four of its GPU). The
slow ones run the real tier in the real sm90 env: sglang's own ServerArgs and
ModelConfig on the generated tiny model and on broken copies of it.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO
from ktenv import spec as specmod
from ktenv import target as targetmod
from ktenv.check import smoke, startup, tier_launch
from ktenv.check.command import command
from ktenv.check.result import FAILED, PASSED, SKIPPED, Context, child_env, probe
from ktenv.host import facts as hostfacts
from ktenv.probes import dsv4_fields

H100 = REPO / "tests/fixtures/doctor/h100"

# V4-Flash's config values as sglang-kt 0.7.2 ships them (configs/config_backup_small.json).
V4_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "vocab_size": 129280, "max_position_embeddings": 1048576,
    "qk_rope_head_dim": 64, "head_dim": 512, "sliding_window": 128, "index_head_dim": 128, "index_n_heads": 64,
    "index_topk": 512, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "compress_rope_theta": 160000, "q_lora_rank": 1024, "o_lora_rank": 1024, "o_groups": 8,
    "rms_norm_eps": 1e-6, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "num_experts_per_tok": 6,
    "n_routed_experts": 256, "moe_intermediate_size": 2048, "n_shared_experts": 1, "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "topk_group": 8, "n_group": 8, "hidden_act": "silu",
    "num_hash_layers": 3, "swiglu_limit": 10.0, "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
}


def broken(**changes) -> dict:
    cfg = copy.deepcopy(V4_FLASH)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


# --- the field table ------------------------------------------------------------------

def test_v4_flash_config_has_every_field_the_path_reads():
    assert dsv4_fields.problems(V4_FLASH, "2604", "2604B", speculative=True) == []
    names = dsv4_fields.read_fields("2604", "2604B", speculative=True)
    assert {"rope_scaling", "head_dim", "sliding_window", "num_hash_layers", "swiglu_limit"} <= set(names)
    assert "qk_nope_head_dim" not in names  # mode 2601 only


@pytest.mark.parametrize("changes, field, words", [
    ({"rope_scaling": {"type": "yarn", "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 65536}},
     "rope_scaling", "lacks 'factor'"),
    ({"rope_scaling": None}, "rope_scaling", "KeyError: 'factor'"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "architectures", "only for DeepseekV4ForCausalLM"),
    ({"compress_ratios": [0, 0, 4, 128]}, "compress_ratios", "has 4 entries for 43 layers"),
    ({"compress_ratios": [0, 0, 8] + [4] * 41}, "compress_ratios", "entry 2 is 8"),
    ({"num_key_value_heads": 8}, "num_key_value_heads", "asserts num_key_value_heads == 1"),
    ({"swiglu_limit": None}, "swiglu_limit", "2604B"),
    ({"hidden_act": "gelu"}, "hidden_act", "Unsupported activation"),
    ({"n_group": 4, "topk_group": 8}, "n_group", "below topk_group 8"),
    ({"num_nextn_predict_layers": 0}, "num_nextn_predict_layers", "EAGLE"),
    ({"head_dim": None}, "head_dim", "is missing"),
])
def test_each_broken_field_is_named(changes, field, words):
    bad = dsv4_fields.problems(broken(**changes), "2604", "2604B", speculative=True)
    assert bad and bad[0]["field"] == field, bad
    assert words in bad[0]["problem"]


def test_mode_decides_which_fields_are_read():
    # 2601 reads qk_nope_head_dim/v_head_dim/window_size instead of head_dim/sliding_window.
    bad = dsv4_fields.problems(V4_FLASH, "2601", "", speculative=False)
    assert [b["field"] for b in bad] == ["qk_nope_head_dim", "v_head_dim", "window_size",
                                         "first_k_dense_replace", "moe_layer_freq"]
    # Without 2604B nothing asks for swiglu_limit; without EAGLE nothing asks for the NextN layer.
    assert dsv4_fields.problems(broken(swiglu_limit=None, num_nextn_predict_layers=0), "2604", "2604A") == []


# --- the tiny start's command ------------------------------------------------------------

def offline_ctx(arch: str = "sm90", env: dict | None = None) -> Context:
    """A Context for building commands only (no env is run)."""
    spec = specmod.load(str(REPO / "envs"))
    t = targetmod.Target(spec, spec.arch(arch), spec.stack.default, REPO / "lock" / arch, Path("/nonexistent-env"))
    return Context(target=t, env=child_env(t, base=env or {}))


def four_h100s() -> hostfacts.HostFacts:
    """The real H100 recording, with its GPU four times (distinct index, UUID, bus)."""
    facts = hostfacts.recorded_facts(H100)
    g = facts.gpu.gpus[0]
    gpus = tuple(replace(g, index=i, uuid=g.uuid[:-1] + str(i), pci_bus_id=f"00000000:0{i}:00.0") for i in range(4))
    return replace(facts, gpu=replace(facts.gpu, gpus=gpus))


TINY = {"gpu_experts": 0}


def flag(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, t in enumerate(argv) if t == name]


def test_tiny_start_uses_one_gpu_and_tp1_on_a_four_gpu_host(monkeypatch):
    ctx = offline_ctx()
    facts = four_h100s()
    full, _ = command(ctx, "/m", facts=facts)
    assert flag(full.server_args, "--tensor-parallel-size") == ["4"]  # what `build.py launch` gives this host
    # The user shows GPUs 2 and 3; the tiny start takes the first of those.
    facts = replace(facts, env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3"})
    cmd, err, gpu = startup.tiny_command(ctx, Path("/m"), TINY, 31234, facts=facts, require_gpu=True)
    assert not err and gpu.index == 2
    assert flag(cmd.server_args, "--tensor-parallel-size") == ["1"]
    assert flag(cmd.server_args, "--port") == ["31234"] and flag(cmd.server_args, "--kt-num-gpu-experts") == ["0"]
    assert "--speculative-algorithm" not in cmd.server_args
    env = startup.server_env(ctx, cmd, gpu, deadline=1800)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # sglang int()s it
    assert env["SGLANG_WARMUP_TIMEOUT"] == "1800" and env["PYTHONUNBUFFERED"] == "1"
    # The CPU sizing is the one-GPU one: launch on a one-H100 host gives the same --kt-cpuinfer.
    one, _ = command(ctx, "/m", facts=hostfacts.recorded_facts(H100))
    assert flag(cmd.server_args, "--kt-cpuinfer") == flag(one.server_args, "--kt-cpuinfer")


def test_numactl_only_when_installed(monkeypatch, tmp_path):
    ctx = offline_ctx()
    facts = hostfacts.recorded_facts(H100)  # one NUMA node
    monkeypatch.setenv("PATH", str(tmp_path))  # no numactl here
    cmd, _, _ = startup.tiny_command(ctx, Path("/m"), TINY, 31234, facts=facts)
    assert cmd.numactl == [] and cmd.argv[0] == str(ctx.python)
    assert any("numactl is not installed" in n for n in cmd.notes)
    fake = tmp_path / "numactl"
    fake.write_text("#!/bin/sh\nexec \"$@\"\n")
    fake.chmod(0o755)
    cmd, _, _ = startup.tiny_command(ctx, Path("/m"), TINY, 31234, facts=facts)
    assert cmd.numactl == [str(fake), "--interleave=all"]


def test_not_exercised_names_the_real_profiles_paths():
    gaps = " ".join(startup.not_exercised(offline_ctx(), TINY))
    for words in ("GPU experts: the profile keeps 144 experts per layer", "layerwise prefill", "EAGLE/NextN",
                  "dynamic expert update", "hash-routed layers"):
        assert words in gaps, gaps


def test_launch_gpu_refuses_a_recorded_host(monkeypatch):
    """A recording names another machine's GPU; the GPU tier must not start a server for it here."""
    monkeypatch.setenv("KTENV_HOST_RECORDING", str(H100))
    res = tier_launch.launch_gpu_tier(offline_ctx())
    assert [r.status for r in res] == [SKIPPED]
    assert "KTENV_HOST_RECORDING" in res[0].evidence


# --- the real tier in the real sm90 env --------------------------------------------------

needs_env = [pytest.mark.slow]
ENV: list[Path] = []  # the real env's prefix, set by the tiny_work fixture


def env_ctx(work: Path) -> Context:
    ctx = smoke.context(targetmod.resolve(specmod.load(REPO / "envs"), "sm90", lock_root=REPO / "lock", prefix=ENV[0]))
    ctx.work = work
    return ctx


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory, stack_env) -> Path:
    """One generated tiny model for the module's tests (startup.tiny_model reuses it from the work dir)."""
    ENV[:] = [stack_env]
    work = tmp_path_factory.mktemp("tiny-work")
    _, tiny, why = startup.tiny_model(env_ctx(work), cache=work / "smoke-tiny")
    assert tiny, why
    return work


def model_copy(tiny: Path, dest: Path, edit) -> Path:
    """The tiny model with an edited config.json (the experts are linked, not copied)."""
    dest.mkdir()
    for f in tiny.iterdir():
        (dest / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dest / f.name)
    cfg = json.loads((dest / "config.json").read_text())
    edit(cfg)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _slow(f):
    for m in needs_env:
        f = m(f)
    return f


@_slow
def test_server_args_tier_on_the_tiny_model_and_a_model_without_yarn(tiny_work, tmp_path, monkeypatch):
    """The issue's bug: a config whose rope_scaling lacks the YaRN keys stops sglang with KeyError: 'factor'."""
    monkeypatch.setenv("KTENV_CACHE_DIR", str(tiny_work))  # the tier finds the fixture's model there
    ctx = env_ctx(tiny_work)
    model, tiny, why = startup.tiny_model(ctx)
    ctx.model = str(model_copy(model, tmp_path / "no-yarn", lambda c: c.pop("rope_scaling")))
    res = {r.name: r for r in startup.server_args_tier(ctx)}
    for name in ("tiny model", "ServerArgs + model config: tiny model, the launch-gpu command",
                 "ServerArgs + model config: tiny model, the `build.py launch` command"):
        assert res[name].status == PASSED, res[name]
    gpu_cmd = res["ServerArgs + model config: tiny model, the launch-gpu command"]
    assert "attention backend compressed, page size 256, KV cache fp8_e4m3, context 4096, 4 layers" in gpu_cmd.evidence
    assert [s["what"] for s in gpu_cmd.detail["stubbed"]] == ["torch.cuda", "sgl_kernel", "nvidia-smi"]
    assert "speculative EAGLE" in res["ServerArgs + model config: tiny model, the `build.py launch` command"].evidence
    user = res[f"ServerArgs + model config: your model ({ctx.model})"]
    assert user.status == FAILED
    assert ("sglang/srt/configs/model_config.py:586 in _derive_model_shapes raises KeyError: 'factor' "
            "(config field rope_scaling.factor)") in user.evidence
    assert "before it touches the GPU" in user.remedy


@_slow
def test_server_args_probe_names_the_first_broken_field(tiny_work, tmp_path, monkeypatch):
    """Several broken copies of the tiny model through the probe in one run (one import, a fork each)."""
    probe_tmp = tmp_path / "probe-tmp"
    probe_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(probe_tmp))  # the probe's own temp files, looked at below
    ctx = env_ctx(tiny_work)
    model, tiny, why = startup.tiny_model(ctx, cache=tiny_work / "smoke-tiny")
    assert startup.tiny_model(ctx, cache=tiny_work / "smoke-tiny") == (model, tiny, "")  # reused, not regenerated
    breaks = {
        "no-factor": lambda c: c["rope_scaling"].pop("factor"),
        "v3": lambda c: c.update(architectures=["DeepseekV3ForCausalLM"]),
        "short-ratios": lambda c: c.update(compress_ratios=[0, 0]),
        "bad-ratio": lambda c: c.update(compress_ratios=[0, 0, 4, 64, 0]),
    }
    cases = []
    for name, edit in breaks.items():
        m = model_copy(model, tmp_path / name, edit)
        cmd, _, _ = startup.tiny_command(ctx, m, tiny, 30000, facts=hostfacts.recorded_facts(H100))
        cases.append({"name": name, "argv": cmd.server_args, "env": cmd.env, "config": str(m / "config.json")})
    r, why = probe(ctx, "smoke_server_args.py", [], {"gpu": {"cc": "9.0", "name": "H100 stand-in",
                                                                   "memory_mib": 81920}, "cases": cases},
                         timeout=startup.PROBE_TIMEOUT)
    assert r and "cases" in r, why
    got = {c["name"]: c["failure"] for c in r["cases"]}
    assert not any(c["ok"] for c in r["cases"])
    assert got["no-factor"]["field"] == "rope_scaling.factor"
    assert got["no-factor"]["file"] == "transformers/modeling_rope_utils.py"  # transformers-kt validates YaRN keys
    assert got["v3"]["stage"] == "fields" and got["v3"]["field"] == "architectures"
    assert got["short-ratios"]["field"] == "compress_ratios" and "has 2 entries for 4 layers" in got["short-ratios"]["problem"]
    assert got["bad-ratio"]["field"] == "compress_ratios" and "entry 3 is 64" in got["bad-ratio"]["problem"]
    # A host without a working nvidia-smi gets a stand-in for the run; it goes with the probe.
    assert not list(probe_tmp.glob("ktenv-smi-*")), "the nvidia-smi stand-in was left behind"


@_slow
def test_cli_smoke_server_args_with_a_broken_model(tiny_work, tmp_path, cli):
    ctx = env_ctx(tiny_work)
    model, tiny, why = startup.tiny_model(ctx, cache=tiny_work / "smoke-tiny")
    m = model_copy(model, tmp_path / "v3", lambda c: c.update(architectures=["DeepseekV3ForCausalLM"]))
    p = cli("smoke", "--arch", "sm90", "--prefix", str(ctx.prefix), "--tier", "server-args", "--model", str(m),
            env={"KTENV_CACHE_DIR": str(tiny_work)}, timeout=3000)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"FAIL ServerArgs + model config: your model ({m}): {m}/config.json: field architectures is " \
           "['DeepseekV3ForCausalLM']" in p.stdout


SHIM = """#!{python}
# Stands in for the env's python: `-m sglang.launch_server ...` becomes the fake
# server (after recording its argv and environment); anything else runs the real env python.
import json, os, sys
if sys.argv[1:3] == ["-m", "sglang.launch_server"]:
    args = sys.argv[3:]
    keys = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "SGLANG_WARMUP_TIMEOUT", "PYTHONUNBUFFERED", "SGLANG_DSV4_MODE")
    json.dump({{"argv": args, "env": {{k: os.environ.get(k) for k in keys}}}}, open({record!r}, "w"))
    os.execv({python!r}, [{python!r}, {fake!r}, os.environ["FAKE_MODE"], args[args.index("--port") + 1]])
os.execv({real!r}, [{real!r}] + sys.argv[1:])
"""


@_slow
@pytest.mark.parametrize("mode", ["ok", "repeat"])
def test_launch_gpu_tier_against_a_stand_in_server(tiny_work, tmp_path, monkeypatch, mode):
    """The whole launch-gpu tier on a recorded four-H100 host, the server replaced by the fake one:
    what it starts (one GPU, TP 1, the warmup cap, unbuffered output) and what it demands of the answers."""
    import sys

    monkeypatch.setenv("KTENV_CACHE_DIR", str(tiny_work))
    monkeypatch.setenv("FAKE_MODE", mode)
    monkeypatch.setenv("KTENV_SMOKE_START_TIMEOUT", "120")
    ctx = env_ctx(tiny_work)
    shim, record = tmp_path / "python", tmp_path / "started.json"
    shim.write_text(SHIM.format(python=sys.executable, record=str(record), real=str(ctx.python),
                                fake=str(REPO / "tests/fixtures/smoke/fake_server.py")))
    shim.chmod(0o755)
    ctx.python, ctx.work = shim, tmp_path / "work"
    res = {r.name: r for r in tier_launch.launch_gpu_tier(ctx, facts=four_h100s())}
    started = json.loads(record.read_text())
    assert flag(started["argv"], "--tensor-parallel-size") == ["1"]
    assert flag(started["argv"], "--load-format") == ["dummy"] and "--speculative-algorithm" not in started["argv"]
    assert started["env"] == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                              "SGLANG_WARMUP_TIMEOUT": "120", "PYTHONUNBUFFERED": "1", "SGLANG_DSV4_MODE": "2604"}
    server = res["server on a tiny DeepSeek-V4"]
    assert "Not exercised by the tiny start: GPU experts" in server.evidence
    if mode == "ok":
        assert server.status == PASSED, server
        assert "kt-kernel loaded 256 experts of each of the 4 layers" in server.evidence
    else:
        assert server.status == FAILED
        assert "distinct tokens failed: one token repeated" in server.evidence
        assert (ctx.work / "server.log").is_file() and str(ctx.work / "server.log") in server.remedy
