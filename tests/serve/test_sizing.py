"""ktenv.serve.sizing: --kt-num-gpu-experts and the memory flags sized to the GPUs.

The two upstream RTX 5090 settings are run through the same rule: the
8-GPU doc setting's memory flags come out of it and its 144 experts fit; the
single-GPU tutorial's workload flags come out of it, and its 10 experts are
shown not to fit sglang-kt 0.7.2 beside the layerwise-prefill reservation
(13.9 GiB) that 0.7.2 added after the tutorial was validated on 0.6.2.post2.
The byte formulas are compared with sglang-kt's own functions in the real env.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from ktenv import spec
from ktenv.host import facts as hostfacts
from ktenv.serve import launch
from ktenv.errors import KtenvError
from ktenv.serve import model as modelmod
from ktenv.serve import sizing
from ktenv.serve import weights as w

ROOT = Path(__file__).resolve().parents[2]
FLASH_DIR = ROOT / "tests" / "fixtures" / "models" / "deepseek-v4-flash"
GIB = 2**30
RTX5090 = 32607 * 2**20  # NVML's memory.total for an RTX 5090 (the doctor fixture's value)
RTX4090 = 24564 * 2**20


@pytest.fixture(scope="module")
def envs():
    return spec.load(ROOT / "envs")


@pytest.fixture(scope="module")
def cfg():
    return spec.load(ROOT / "envs").knowledge.serve


@pytest.fixture(scope="module")
def flash():
    return modelmod.read(FLASH_DIR)


def plan(envs, cfg, flash, arch, gpus, given=None, speculative=True, asked=False):
    profile = spec.launch_profile(envs, arch)["args"]
    return sizing.plan(cfg, flash, arch, gpus, profile, given or {}, speculative, asked)


# --- the two upstream settings ---------------------------------------------------------

def test_eight_rtx5090_doc_setting_comes_out_of_the_rule(envs, cfg, flash):
    p = plan(envs, cfg, flash, "sm120", [RTX5090] * 8)
    f = p.flags
    # The doc's (ktransformers doc/en/DeepSeek-V4-Flash.md, 2026-05-03) memory flags:
    assert f["mem-fraction-static"] == ["0.80"]
    assert f["max-total-tokens"] == ["32768"]
    assert f["cuda-graph-bs"] == ["1", "2", "4"] and f["cuda-graph-max-bs"] == ["4"]
    assert f["max-running-requests"] == ["4"]
    assert p.workload.speculative and f["kt-gpu-prefill-token-threshold"] == ["4096"]
    # Its 144 experts per layer fit this budget; the rule itself gives what fills it.
    assert p.budget.fits(144)
    assert f["kt-num-gpu-experts"] == ["217"] and not p.budget.fits(218)
    explicit = plan(envs, cfg, flash, "sm120", [RTX5090] * 8, {"kt-num-gpu-experts": ["144"]})
    assert explicit.flags["kt-num-gpu-experts"] == ["144"]


def test_one_rtx5090_tutorial_setting_comes_out_of_the_rule(envs, cfg, flash):
    p = plan(envs, cfg, flash, "sm120", [RTX5090])
    f = p.flags
    # The tutorial's (2026-05-09, validated on one RTX 5090) workload flags:
    assert f["context-length"] == ["16384"] and f["max-running-requests"] == ["2"]
    assert f["cuda-graph-bs"] == ["1"] and f["cuda-graph-max-bs"] == ["1"]
    # ...without EAGLE (net-negative on one CPU-bound GPU upstream) and without layerwise GPU prefill,
    # as the tutorial ran: on 0.7.2 its slots would take 13.9 GiB, over a quarter of the static pool.
    assert not p.workload.speculative and any("Left out EAGLE" in n for n in p.notes)
    assert f["kt-gpu-prefill-token-threshold"] == ["0"] and any("more than 25% of the static pool" in n for n in p.notes)
    assert p.budget.reservation == 0 and f["mem-fraction-static"] == ["0.90"]
    # The tutorial's 10 experts per layer fit that budget; the rule gives what fills it.
    assert p.budget.fits(10) and f["kt-num-gpu-experts"] == ["31"] and not p.budget.fits(32)
    tutorial = {"kt-num-gpu-experts": ["10"], "mem-fraction-static": ["0.85"], "context-length": ["16384"]}
    assert plan(envs, cfg, flash, "sm120", [RTX5090], tutorial).flags["kt-num-gpu-experts"] == ["10"]
    # Asking for layerwise prefill on one 5090: 0.7.2 reserves two raw + two Marlin full-expert layers, 13.9 GiB,
    # and the tutorial's 10 no longer fit beside them.
    with pytest.raises(KtenvError, match=r"--kt-num-gpu-experts 10 does not fit 1 GPU\(s\) of 31.8 GiB") as e:
        plan(envs, cfg, flash, "sm120", [RTX5090], {**tutorial, "kt-gpu-prefill-token-threshold": ["4096"]})
    assert "layerwise-prefill reservation                     13.88 GiB" in str(e.value)
    assert round(w.layerwise_reservation_bytes(flash, 1) / GIB, 1) == 13.9


def test_the_issue_case_144_on_one_gpu_is_refused_with_the_numbers(envs, cfg, flash):
    with pytest.raises(KtenvError) as e:
        plan(envs, cfg, flash, "sm120", [RTX5090], {"kt-num-gpu-experts": ["144"]})
    msg = str(e.value)
    assert "--kt-num-gpu-experts 144 does not fit 1 GPU(s) of 31.8 GiB" in msg
    assert "144 experts x 43 MoE layers on every GPU" in msg and "At most" in msg


def test_more_experts_than_a_layer_has_is_refused(envs, cfg, flash):
    with pytest.raises(KtenvError, match="more than the 256 routed experts a layer has; the value is per MoE layer"):
        plan(envs, cfg, flash, "sm90", [80 * GIB] * 8, {"kt-num-gpu-experts": ["257"]})


def test_a_gpu_too_small_for_the_weights_is_refused(envs, cfg, flash):
    with pytest.raises(KtenvError, match=r"does not fit 1 GPU\(s\) of 10.0 GiB even with no routed expert"):
        plan(envs, cfg, flash, "sm89", [10 * GIB])


def test_what_is_given_up_first_on_a_24gb_4090(envs, cfg, flash):
    p = plan(envs, cfg, flash, "sm89", [RTX4090])
    assert not p.workload.speculative and p.flags["kt-gpu-prefill-token-threshold"] == ["0"]
    assert p.budget.reservation == 0 and int(p.flags["kt-num-gpu-experts"][0]) > 0
    # Asked-for EAGLE is kept (and costs the experts), not silently dropped.
    asked = plan(envs, cfg, flash, "sm89", [RTX4090], {"speculative-algorithm": ["EAGLE"]}, asked=True)
    assert asked.workload.speculative and asked.budget.draft > 0


def test_hopper_keeps_the_lazy_layer_slot_outside_the_static_pool(envs, cfg, flash):
    p = plan(envs, cfg, flash, "sm90", [81559 * 2**20])
    assert p.budget.reservation == 0 and p.budget.lazy_slot == w.lazy_slot_bytes(flash, 1)
    assert p.budget.gpu - p.budget.static >= p.budget.headroom_need


def test_an_intermediate_size_that_does_not_split_is_refused(envs, cfg, flash):
    with pytest.raises(KtenvError, match="does not split into 3 parts"):
        plan(envs, cfg, flash, "sm120", [RTX5090] * 3)


def test_settings_refuse_an_unknown_key(envs_copy):
    p = envs_copy / "serve.toml"
    p.write_text(p.read_text().replace("kv_tokens = ", "kv_tokenz = "))
    with pytest.raises(KtenvError, match=r"serve.toml: unknown key\(s\) kv_tokenz in \[sizing\]"):
        spec.load(envs_copy)


# --- the model's facts ------------------------------------------------------------------

def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    """A real safetensors file: an 8-byte little-endian header length, the JSON header, the bytes."""
    header, off = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * off)


def test_expert_format_comes_from_the_safetensors_header(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((FLASH_DIR / "config.json").read_text())
    cfg.pop("expert_dtype")
    (d / "config.json").write_text(json.dumps(cfg))
    assert modelmod.read(d).expert_format == "unknown"  # no weights, no expert_dtype: said in a note
    _safetensors(d / "a.safetensors", {"layers.0.ffn.experts.0.w1.weight": ("I8", [4, 4], 16),
                                       "layers.0.ffn.shared_experts.w1.weight": ("F8_E4M3", [4, 4], 16)})
    assert modelmod.read(d).expert_format == "mxfp4"
    _safetensors(d / "a.safetensors", {"layers.0.ffn.experts.0.w1.weight": ("F8_E4M3", [4, 4], 16)})
    m = modelmod.read(d)
    assert m.expert_format == "fp8" and "a.safetensors: F8_E4M3" in m.expert_format_from


def test_a_model_that_is_not_deepseek_v4_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(KtenvError, match="not DeepSeek-V4; ktenv's launch sizing and AMXINT4 conversion know only"):
        modelmod.read(tmp_path)


def test_non_expert_weights_match_the_published_parameter_count(flash):
    # DeepSeek-V4-Flash: 284B parameters in all; the routed experts are 43 x 256 x 3 x 4096 x 2048.
    routed = flash.layers * flash.experts * 3 * flash.hidden * flash.inter
    non_expert_gb = w.non_expert_bytes(flash, 1) / 1e9  # ~1 byte a weight (FP8) + bf16 embeddings
    assert 275e9 < routed < 280e9 and 8 < non_expert_gb < 12


# --- sglang-kt's own arithmetic, run in the real env ---------------------------------------

def test_byte_formulas_agree_with_sglang_kt(flash, stack_python):
    swa = w.swa_ratio(2048, 32768)
    q = dict(experts=flash.experts, hidden=flash.hidden, inter=flash.inter, layers=flash.layers,
             head_dim=flash.head_dim, rope_dim=flash.rope_dim, index_head_dim=flash.index_head_dim,
             compress_ratios=list(flash.compress_ratios), window=flash.window, tp=[1, 2, 8], gpu_experts=10, swa=swa)
    p = subprocess.run([str(stack_python), str(ROOT / "ktenv" / "probes" / "sizing_probe.py")],
                       input=json.dumps(q), capture_output=True, text=True, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("KTENV-RESULT ")]
    assert line, p.stderr[-2000:]
    r = json.loads(line[-1].split(" ", 1)[1])
    assert r["ok"], r
    for tp in (1, 2, 8):
        assert r["per_tp"][str(tp)]["raw_layer"] == w.raw_layer_bytes(flash, tp)
        assert r["per_tp"][str(tp)]["marlin_layer"] == w.marlin_layer_bytes(flash, tp)
    assert r["kv_bytes_per_token"]["plain"] == pytest.approx(w.kv_bytes_per_token(flash, swa, False))
    assert r["kv_bytes_per_token"]["speculative"] == pytest.approx(w.kv_bytes_per_token(flash, swa, True))
    # --kt-num-gpu-experts is per layer: 10 gives every one of the 43 MoE layers 10.
    assert r["gpu_experts_per_layer"] == [10] * flash.moe_layers


# --- threads and the CLI ----------------------------------------------------------------

def test_kt_cpuinfer_above_the_physical_cores_is_refused(envs, flash):
    f = hostfacts.recorded_facts(ROOT / "tests" / "fixtures" / "doctor" / "mixed-3090-4090")  # 32 cores, 64 threads
    kw = dict(model="/m", python="/p", numactl="numactl", user_env={}, model_facts=flash)
    with pytest.raises(KtenvError, match=r"--kt-cpuinfer 64 is more than the 32 physical cores of this host "
                                         r"\(64 logical CPUs: the rest are hyper-threads\).*~28 -> 2.7 tok/s"):
        launch.build_command(envs, "sm89", f, extra=["--", "--kt-cpuinfer", "64"], **kw)
    a = launch.build_command(envs, "sm89", f, extra=["--", "--kt-cpuinfer=32"], **kw).server_args
    assert "--kt-cpuinfer=32" in a


def test_explicit_flags_after_dashdash_are_checked_and_kept(envs, flash):
    f = hostfacts.recorded_facts(ROOT / "tests" / "fixtures" / "doctor" / "h100")
    kw = dict(model="/m", python="/p", numactl="numactl", user_env={}, model_facts=flash)
    with pytest.raises(KtenvError, match=r"--kt-num-gpu-experts 200 does not fit 1 GPU\(s\) of 79.6 GiB"):
        launch.build_command(envs, "sm90", f, extra=["--", "--kt-num-gpu-experts", "200"], **kw)
    a = launch.build_command(envs, "sm90", f, extra=["--", "--kt-num-gpu-experts", "40"], **kw).server_args
    assert a.count("--kt-num-gpu-experts") == 1 and a[a.index("--kt-num-gpu-experts") + 1] == "40"


def test_cli_host_facts_prints_the_command_for_the_recorded_host(cli, tmp_path):
    model = tmp_path / "DeepSeek-V4-Flash"
    model.mkdir()
    (model / "config.json").write_text((FLASH_DIR / "config.json").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_DSV4", "CUDA_", "KT_KERNEL", "KTENV_HOST"))}
    p = cli("launch", "--arch", "sm90", "--model", str(model), "--host-facts",
            str(ROOT / "tests" / "fixtures" / "doctor" / "h100"), env=env)
    assert p.returncode == 0, p.stderr
    assert "--kt-cpuinfer 15" in p.stdout and "--tensor-parallel-size 1" in p.stdout
    assert "Sized for 1 GPU(s) of 79.6 GiB" in p.stderr and "--host-facts), not this machine" in p.stderr


def test_gpu_experts_ratio_is_checked_as_what_sglang_makes_of_it(envs, cfg, flash):
    with pytest.raises(KtenvError, match=r"--kt-num-gpu-experts 230 does not fit 1 GPU\(s\) of 79.6 GiB"):
        plan(envs, cfg, flash, "sm90", [81559 * 2**20], {"kt-gpu-experts-ratio": ["0.9"]})
    p = plan(envs, cfg, flash, "sm90", [81559 * 2**20], {"kt-gpu-experts-ratio": ["0.1"]})
    assert p.flags["kt-num-gpu-experts"] == ["25"] and any("overrides --kt-num-gpu-experts" in n for n in p.notes)
