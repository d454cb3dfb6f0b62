"""What `launch` and `convert` need to know about a DeepSeek-V4 checkpoint.

Read from the checkpoint directory without torch: config.json for the shape,
and the safetensors headers (an 8-byte length and a JSON table, the same
probe sglang-kt does in configs/_model_config_dsv4.py) for the routed experts'
storage format. A directory with only config.json (a `--host-facts` dry run
for a model not downloaded yet) is read from config.json alone.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KtenvError

# sglang-kt's own pattern for a routed-expert weight (not the shared expert),
# in the HF layout and in DeepSeek-V4's inference layout.
ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.(?:w[123]|down_proj|up_proj|gate_proj)\.weight$")
V4_ARCHS = ("DeepseekV4ForCausalLM",)
V4_TYPES = ("deepseek_v4", "deepseek_ref")


class ModelError(KtenvError):
    """The model directory is not a DeepSeek-V4 checkpoint ktenv can size or convert."""


@dataclass(frozen=True)
class ModelFacts:
    path: str
    layers: int
    experts: int
    topk: int
    hidden: int
    inter: int  # expert intermediate size
    shared_experts: int
    vocab: int
    head_dim: int
    heads: int
    q_lora: int
    o_lora: int
    o_groups: int
    index_heads: int
    index_head_dim: int
    rope_dim: int
    window: int
    hc_mult: int
    compress_ratios: tuple[int, ...]  # one per layer, then the NextN layer(s)
    nextn: int
    hash_layers: int
    tie_embeddings: bool
    swiglu_limit: float
    expert_format: str  # "mxfp4", "fp8", "bf16" or "unknown"
    expert_format_from: str  # where expert_format was read
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def moe_layers(self) -> int:
        """MoE layers as sglang-kt counts them for --kt-num-gpu-experts.

        DeepSeek-V4 (mode 2604) has no dense layers: first_k_dense_replace is
        0 and moe_layer_freq 1 (deepseek_v4._is_layer_sparse); its hash-routed
        layers carry routed experts and count too (kt_ep_wrapper subtracts
        num_hash_layers from first_k_dense_replace).
        """
        return self.layers


def _need(cfg: dict, key: str, path: Path, *alts: str):
    for k in (key, *alts):
        if cfg.get(k) is not None:
            return cfg[k]
    raise ModelError(
        f"{path}/config.json has no {key!r}; ktenv reads the DeepSeek-V4 shape from it (layers, experts, expert "
        "and attention sizes). Is this the checkpoint's own config.json?"
    )


def read_config(model: str | Path) -> dict:
    path = Path(model)
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} has no config.json: point --model at the checkpoint's top directory.") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path} is not valid JSON ({e}); re-download it.") from None
    return cfg.get("text_config") or cfg


def expert_dtype(model: str | Path) -> tuple[str | None, str]:
    """(safetensors dtype of one routed-expert weight, the file it came from), or (None, why not)."""
    path = Path(model)
    index = path / "model.safetensors.index.json"
    shard = key = None
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        for k, f in weight_map.items():
            if ROUTED_EXPERT.search(k):
                key, shard = k, path / f
                break
        if key is None:
            return None, f"{index.name} names no routed-expert weight"
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            return None, "no *.safetensors in the directory"
        shard = shards[0]
    try:
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        return None, f"cannot read the safetensors header of {shard.name}: {e}"
    if key is None:
        key = next((k for k in header if ROUTED_EXPERT.search(k)), None)
        if key is None:
            return None, f"{shard.name} holds no routed-expert weight"
    meta = header.get(key)
    return (meta.get("dtype") if meta else None), shard.name


def read(model: str | Path) -> ModelFacts:
    """The facts of the DeepSeek-V4 checkpoint at `model`; ModelError if it is something else."""
    path = Path(model)
    cfg = read_config(path)
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type", "")
    if not (set(archs) & set(V4_ARCHS) or mtype in V4_TYPES):
        raise ModelError(
            f"{path}/config.json describes {archs or mtype or 'an unknown model'}, not DeepSeek-V4; ktenv's launch "
            "sizing and AMXINT4 conversion know only DeepSeek-V4-Flash's layout. Pass the sglang flags yourself "
            "after `--`."
        )
    layers = int(_need(cfg, "num_hidden_layers", path))
    nextn = int(cfg.get("num_nextn_predict_layers", 0) or 0)
    ratios = tuple(int(r) for r in (cfg.get("compress_ratios") or [0] * (layers + nextn)))
    notes = []
    dtype, where = expert_dtype(path)
    if dtype in ("U8", "I8", "F4"):
        fmt, src = "mxfp4", f"safetensors header ({where}: {dtype})"
    elif dtype == "F8_E4M3":
        fmt, src = "fp8", f"safetensors header ({where}: {dtype})"
    elif dtype in ("BF16", "F16"):
        fmt, src = "bf16", f"safetensors header ({where}: {dtype})"
    elif str(cfg.get("expert_dtype", "")).lower() == "fp4":
        fmt, src = "mxfp4", f"config.json expert_dtype ({where})"
    else:
        fmt, src = "unknown", where
        notes.append(f"The routed experts' format could not be read ({where}); sizing assumes MXFP4, "
                     "DeepSeek-V4-Flash's release format.")
    return ModelFacts(
        path=str(path), layers=layers,
        experts=int(_need(cfg, "n_routed_experts", path, "num_experts")),
        topk=int(_need(cfg, "num_experts_per_tok", path)),
        hidden=int(_need(cfg, "hidden_size", path)),
        inter=int(_need(cfg, "moe_intermediate_size", path)),
        shared_experts=int(cfg.get("n_shared_experts", 0) or 0),
        vocab=int(_need(cfg, "vocab_size", path)),
        head_dim=int(_need(cfg, "head_dim", path)),
        heads=int(_need(cfg, "num_attention_heads", path)),
        q_lora=int(_need(cfg, "q_lora_rank", path)),
        o_lora=int(_need(cfg, "o_lora_rank", path)),
        o_groups=int(_need(cfg, "o_groups", path)),
        index_heads=int(cfg.get("index_n_heads", 0) or 0),
        index_head_dim=int(cfg.get("index_head_dim", 0) or 0),
        rope_dim=int(_need(cfg, "qk_rope_head_dim", path)),
        window=int(cfg.get("sliding_window") or cfg.get("window_size") or 128),
        hc_mult=int(cfg.get("hc_mult", 1) or 1),
        compress_ratios=ratios, nextn=nextn,
        hash_layers=int(cfg.get("num_hash_layers", cfg.get("n_hash_layers", 0)) or 0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        swiglu_limit=float(cfg.get("swiglu_limit", 0.0) or 0.0),
        expert_format=fmt, expert_format_from=src, notes=tuple(notes),
    )
