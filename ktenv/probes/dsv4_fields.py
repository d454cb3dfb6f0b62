"""The DeepSeek-V4 config fields sglang-kt 0.7.2 reads on its GPU path, and what it needs of each.

Standard library only: the probes that run inside an env import it (they sit
in the same folder, which is sys.path[0] when they run as scripts), and a
test can import it from ktenv.

Read from the installed sglang-kt 0.7.2 (paths under sglang/srt/):
  configs/model_config.py       _derive_model_shapes, DeepSeek-V4 branch
  models/deepseek_v4.py         MQALayer, Compressor, C4Indexer, DecoderLayer, Model
  models/deepseek_v2.py         DeepseekV2MoE (V4's _V4MoE subclasses it)
  layers/rotary_embedding/factory.py   get_rope, rope_type "deepseek_yarn"
  layers/deepseek_v4_rope.py    precompute_freqs_cis
  layers/quantization/mxfp4_deepseek.py, layers/moe/kt_ep_wrapper.py
Each entry names where its field is read, so a failure says which code would
have tripped over it, and when (at start-up, or minutes in while the model
is built on the GPU).

`problems(cfg, mode, submode, speculative)` walks the table in order and
returns one sentence per problem; the caller reports the first.
"""

from __future__ import annotations

import math

MODEL_CONFIG = "configs/model_config.py (_derive_model_shapes)"
ATTN = "models/deepseek_v4.py (MQALayer.__init__)"
ROPE = "layers/rotary_embedding/factory.py (get_rope, deepseek_yarn)"
FREQS = "layers/deepseek_v4_rope.py (precompute_freqs_cis, called by MQALayer)"
MOE = "models/deepseek_v2.py (DeepseekV2MoE.__init__, V4's _V4MoE)"
LAYER = "models/deepseek_v4.py (DeepseekV4DecoderLayer)"
MODEL = "models/deepseek_v4.py (DeepseekV4Model / ForCausalLM)"
INDEXER = "models/deepseek_v4.py (C4Indexer)"
MXFP4 = "layers/quantization/mxfp4_deepseek.py (asserts swiglu_limit iff 2604B)"
KT = "layers/moe/kt_ep_wrapper.py (which layers the CPU experts serve)"
NEXTN = "models/deepseek_v4_nextn.py (the EAGLE/NextN draft layer)"

ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
COMPRESS_RATIOS = (0, 4, 128)  # MQALayer asserts compress_ratio in [0, 4, 128]
SCORING = ("sqrtsoftplus", "sigmoid", "softmax")


def _num(v, positive=True, integer=True) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if integer and not float(v).is_integer():
        return False
    return math.isfinite(v) and (v > 0 if positive else v >= 0)


def _get(cfg, name):
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


# (field, modes it is read in ("" = every mode), readers, check) where check(value, cfg) -> problem or "".
def _positive_int(v, cfg):
    return "" if _num(v) else f"must be a positive integer, is {v!r}"


def _positive(v, cfg):
    return "" if _num(v, integer=False) else f"must be a positive number, is {v!r}"


def _count(v, cfg):
    return "" if _num(v, positive=False) else f"must be an integer >= 0, is {v!r}"


def _architectures(v, cfg):
    if not isinstance(v, (list, tuple)) or not v:
        return f"must be a list naming the model class, is {v!r}"
    if not any(a in ("DeepseekV4ForCausalLM", "DeepseekV4ForCausalLMNextN") for a in v):
        return (f"is {list(v)}; sglang picks the DeepSeek-V4 code (compressed attention, hash MoE, KT experts) only for "
                "DeepseekV4ForCausalLM, any other entry builds another model from these weights")
    return ""


def _kv_heads(v, cfg):
    return "" if v == 1 else f"is {v!r}; MQALayer asserts num_key_value_heads == 1 (one latent KV head)"


def _head_dim_2604(v, cfg):
    if not _num(v):
        return f"must be a positive integer, is {v!r}"
    rope = _get(cfg, "qk_rope_head_dim")
    if _num(rope) and v <= rope:
        return f"is {v}, not above qk_rope_head_dim {rope}: the no-RoPE part (head_dim - qk_rope_head_dim) would be empty"
    return ""


def _v_head_dim_2601(v, cfg):
    nope, rope = _get(cfg, "qk_nope_head_dim"), _get(cfg, "qk_rope_head_dim")
    if _num(nope) and _num(rope) and v != nope + rope:
        return f"is {v!r}; MQALayer asserts it equals qk_nope_head_dim + qk_rope_head_dim = {nope + rope}"
    return _positive_int(v, cfg)


def _o_groups(v, cfg):
    heads = _get(cfg, "num_attention_heads")
    if not _num(v):
        return f"must be a positive integer, is {v!r}"
    if _num(heads) and heads % v:
        return f"is {v}; num_attention_heads ({heads}) must split evenly into o_groups (wo_a is grouped)"
    return ""


def _compress_ratios(v, cfg):
    layers = _get(cfg, "num_hidden_layers")
    if not isinstance(v, (list, tuple)):
        return f"must be a list with one entry per layer, is {v!r}"
    if _num(layers) and len(v) < layers:
        return (f"has {len(v)} entries for {layers} layers; MQALayer reads compress_ratios[layer_id] for every "
                "layer (IndexError while the model is built on the GPU)")
    bad = [(i, r) for i, r in enumerate(v[: layers if _num(layers) else None]) if r not in COMPRESS_RATIOS]
    if bad:
        return f"entry {bad[0][0]} is {bad[0][1]!r}; MQALayer asserts every ratio is one of {list(COMPRESS_RATIOS)}"
    return ""


def _rope_scaling(v, cfg):
    if not isinstance(v, dict) or not v:
        return (f"is {v!r}; the DeepSeek-V4 path needs the YaRN parameters ({', '.join(ROPE_KEYS)}). "
                "Without them transformers fills in {'rope_type': 'default'} and sglang fails with KeyError: 'factor'")
    missing = [k for k in ROPE_KEYS if k not in v]
    if missing:
        return (f"lacks {', '.join(repr(k) for k in missing)} (has {sorted(v)}); sglang reads rope_scaling['factor'] "
                f"in {MODEL_CONFIG}, and all four in {ATTN}, {ROPE} and {FREQS}")
    bad = [k for k in ROPE_KEYS if not _num(v[k], integer=False)]
    if bad:
        return f"{bad[0]} is {v[bad[0]]!r}; it must be a positive number"
    return ""


def _n_routed(v, cfg):
    if not _num(v):
        return f"must be a positive integer, is {v!r}"
    k = _get(cfg, "num_experts_per_tok")
    if _num(k) and k > v:
        return f"is {v}, fewer than num_experts_per_tok {k}: top-k routing cannot pick that many experts"
    return ""


def _groups(v, cfg):
    n, experts = _get(cfg, "topk_group"), _get(cfg, "n_routed_experts")
    if not _num(v):
        return f"must be a positive integer, is {v!r}"
    if _num(n) and n > v:
        return f"is {v}, below topk_group {n}: grouped top-k would pick more groups than exist"
    if _num(experts) and experts % v:
        return f"is {v}; n_routed_experts ({experts}) must split evenly into n_group"
    return ""


def _hidden_act(v, cfg):
    return "" if v == "silu" else f"is {v!r}; DeepseekV2MoE raises 'Unsupported activation' for anything but silu"


def _scoring(v, cfg):
    return "" if v in SCORING else f"is {v!r}; the router knows {', '.join(SCORING)} (V4-Flash: sqrtsoftplus)"


def _hash_layers(v, cfg):
    layers = _get(cfg, "num_hidden_layers")
    if not _num(v, positive=False):
        return f"must be an integer >= 0, is {v!r} (DeepseekV2MoE reads config.num_hash_layers in mode 2604)"
    if _num(layers) and v > layers:
        return f"is {v}, more than num_hidden_layers {layers}"
    return ""


def _swiglu_2604b(v, cfg):
    if v is None:
        return ("is missing; with SGLANG_DSV4_2604_SUBMODE=2604B mxfp4_deepseek.py asserts swiglu_limit is set "
                "(the V4-Flash checkpoint clamps SwiGLU at 10)")
    return _positive(v, cfg)


def _bool(v, cfg):
    return "" if isinstance(v, bool) else f"must be true or false, is {v!r}"


def _nextn(v, cfg):
    return "" if _num(v) else (f"is {v!r}; EAGLE (--speculative-algorithm) builds the NextN draft layer from it, "
                               "so it must be >= 1 (or launch with --no-speculative)")


# The table. Order: what ServerArgs/ModelConfig read first, then the model's constructors in build order.
FIELDS = [
    ("architectures", "", "configs/model_config.py and the model registry", _architectures),
    ("num_hidden_layers", "", f"{MODEL_CONFIG}; {MODEL}; {KT}", _positive_int),
    ("hidden_size", "", f"{MODEL_CONFIG}; every layer", _positive_int),
    ("num_attention_heads", "", f"{MODEL_CONFIG}; {ATTN}", _positive_int),
    ("num_key_value_heads", "", f"{MODEL_CONFIG}; {ATTN}", _kv_heads),
    ("vocab_size", "", f"{MODEL} (embedding, lm_head); hash-routing table", _positive_int),
    ("max_position_embeddings", "", f"{MODEL_CONFIG} (context length); {ROPE}; {FREQS}", _positive_int),
    ("qk_rope_head_dim", "", f"{MODEL_CONFIG}; {ATTN}; {INDEXER}", _positive_int),
    ("head_dim", "2604", f"{MODEL_CONFIG}; {ATTN} (head_dim - qk_rope_head_dim is the no-RoPE part)", _head_dim_2604),
    ("sliding_window", "2604", f"{MODEL_CONFIG} (window_size in mode 2604)", _positive_int),
    ("qk_nope_head_dim", "2601", f"{MODEL_CONFIG}; {ATTN}", _positive_int),
    ("v_head_dim", "2601", f"{MODEL_CONFIG}; {ATTN}", _v_head_dim_2601),
    ("window_size", "2601", MODEL_CONFIG, _positive_int),
    ("index_head_dim", "", f"{MODEL_CONFIG}; {INDEXER}", _positive_int),
    ("index_n_heads", "", INDEXER, _positive_int),
    ("index_topk", "", INDEXER, _positive_int),
    ("compress_ratios", "", f"{MODEL_CONFIG}; {ATTN}", _compress_ratios),
    ("rope_scaling", "", f"{MODEL_CONFIG}; {ATTN}; {ROPE}; {FREQS}", _rope_scaling),
    ("rope_theta", "", f"{ATTN} (RoPE base of uncompressed layers)", _positive),
    ("compress_rope_theta", "", f"{ATTN} (RoPE base of compressed layers)", _positive),
    ("q_lora_rank", "", ATTN, _positive_int),
    ("o_lora_rank", "", ATTN, _positive_int),
    ("o_groups", "", ATTN, _o_groups),
    ("rms_norm_eps", "", f"{ATTN}; {LAYER}", _positive),
    ("hc_mult", "", f"{LAYER}; {NEXTN}", _positive_int),
    ("hc_sinkhorn_iters", "", LAYER, _positive_int),
    ("hc_eps", "", f"{LAYER}; {NEXTN}", _positive),
    ("first_k_dense_replace", "2601", f"{LAYER} (mode 2601 only)", _count),
    ("moe_layer_freq", "2601", f"{LAYER} (mode 2601 only)", _positive_int),
    ("num_experts_per_tok", "", MOE, _positive_int),
    ("n_routed_experts", "", f"{MOE}; {LAYER}; {KT}", _n_routed),
    ("moe_intermediate_size", "", MOE, _positive_int),
    ("n_shared_experts", "", MOE, _positive_int),
    ("routed_scaling_factor", "", f"{MOE}; {MXFP4}", _positive),
    ("scoring_func", "", MOE, _scoring),
    ("norm_topk_prob", "", MOE, _bool),
    ("topk_group", "", MOE, _positive_int),
    ("n_group", "", MOE, _groups),
    ("hidden_act", "", MOE, _hidden_act),
    ("num_hash_layers", "2604", f"{MOE} (hash-routed layers); {KT}", _hash_layers),
    ("swiglu_limit", "2604B", MXFP4, _swiglu_2604b),
    ("tie_word_embeddings", "", MODEL, _bool),
]
SPECULATIVE_FIELDS = [("num_nextn_predict_layers", "", f"{NEXTN}; {MODEL}", _nextn)]


def problems(cfg, mode: str = "2604", submode: str = "", speculative: bool = False) -> list[dict]:
    """[{field, readers, problem}] for every field the path reads that is missing or unusable."""
    out = []
    for name, when, readers, check in FIELDS + (SPECULATIVE_FIELDS if speculative else []):
        if when == "2604B" and submode != "2604B":
            continue
        if when in ("2604", "2601") and when != mode:
            continue
        value = _get(cfg, name)
        if value is None and check not in (_swiglu_2604b, _rope_scaling):  # these two explain their absence
            out.append({"field": name, "readers": readers,
                        "problem": f"is missing; sglang reads it in {readers}"})
            continue
        why = check(value, cfg)
        if why:
            out.append({"field": name, "readers": readers, "problem": f"{why} (read in {readers})"})
    return out


def read_fields(mode: str = "2604", submode: str = "", speculative: bool = False) -> list[str]:
    """The names `problems` checks for this mode."""
    return [n for n, when, _, _ in FIELDS + (SPECULATIVE_FIELDS if speculative else [])
            if not when or when == mode or (when == "2604B" and submode == "2604B")]
