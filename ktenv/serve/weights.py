"""Bytes that a DeepSeek-V4 server puts on each GPU rank, from the model's shape.

Each formula follows the tensors sglang-kt 0.7.2 creates (module and function
named in each docstring); `ktenv/probes/sizing_probe.py` runs sglang's own
byte functions where it has them, and tests/test_sizing.py compares. Sizes
are per tensor-parallel rank: "sharded" tensors are split `tp` ways,
"replicated" ones are whole on every rank.
"""

from __future__ import annotations

import math

from .model import ModelFacts

FP8_BLOCK = 128  # quantization_config.weight_block_size of V4-Flash's FP8 linears


def _fp8(rows: int, cols: int) -> int:
    """An FP8 block-quantized linear: 1 byte a weight plus one fp32 scale per 128x128 block."""
    return rows * cols + math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK) * 4


def _bf16(rows: int, cols: int) -> int:
    return rows * cols * 2


def _compressor(m: ModelFacts, ratio: int, head_dim: int) -> int:
    """deepseek_v4.Compressor: ape (fp32), wkv_gate (bf16, unquantized), norm (fp32). Replicated."""
    coff = 2 if ratio == 4 else 1
    return ratio * coff * head_dim * 4 + _bf16(m.hidden, 2 * coff * head_dim) + head_dim * 4


def attention_bytes(m: ModelFacts, ratio: int, tp: int) -> int:
    """deepseek_v4.MQALayer (+ Compressor, + C4Indexer on ratio-4 layers), one rank.

    Replicated: wq_a, wkv (fp8), norms, attn_sink, compressor, indexer.
    Sharded by attention TP: wq_b, wo_b (fp8) and wo_a (bf16 unless
    SGLANG_OPT_FP8_WO_A_GEMM, default off).
    """
    rep = _fp8(m.q_lora, m.hidden) + _fp8(m.head_dim, m.hidden) + m.heads * 4 + (m.q_lora + m.head_dim) * 2
    if ratio:
        rep += _compressor(m, ratio, m.head_dim)
    if ratio == 4 and m.index_heads:
        rep += _fp8(m.index_heads * m.index_head_dim, m.q_lora) + _bf16(m.index_heads, m.hidden)
        rep += _compressor(m, 4, m.index_head_dim)
    sharded = (_fp8(m.heads * m.head_dim, m.q_lora) + _bf16(m.o_groups * m.o_lora, m.heads * m.head_dim // m.o_groups)
               + _fp8(m.hidden, m.o_groups * m.o_lora))
    return rep + sharded // tp


def layer_bytes(m: ModelFacts, ratio: int, tp: int, hash_layer: bool = False) -> int:
    """One decoder layer without its routed experts, one rank.

    DeepseekV4DecoderLayer: attention, two norms, the hyper-connection
    parameters (fp32); _V4MoE: the router (bf16) and its fp32 correction bias,
    the shared expert (fp8 MLP, sharded), and on hash layers the token->expert
    table (int32, deepseek_v4_topk.tid2eid).
    """
    mix = (2 + m.hc_mult) * m.hc_mult
    hc = 2 * (mix * m.hc_mult * m.hidden + mix + 3) * 4
    router = _bf16(m.experts, m.hidden) + m.experts * 4
    shared = 3 * _fp8(m.shared_experts * m.inter, m.hidden) // tp if m.shared_experts else 0
    table = m.vocab * m.topk * 4 if hash_layer else 0
    return attention_bytes(m, ratio, tp) + 2 * m.hidden * 2 + hc + router + shared + table


def non_expert_bytes(m: ModelFacts, tp: int) -> int:
    """Everything of the main model but the routed experts, one rank.

    Embedding and LM head are vocab-parallel bf16 (VocabParallelEmbedding,
    ParallelLMHead); one copy when the embeddings are tied.
    """
    layers = sum(layer_bytes(m, m.compress_ratios[i] if i < len(m.compress_ratios) else 0, tp, i < m.hash_layers)
                 for i in range(m.layers))
    heads = (1 if m.tie_embeddings else 2) * _bf16(m.vocab, m.hidden) // tp
    return layers + heads + m.hc_mult * (m.hc_mult * m.hidden + 2) * 4


# --- routed experts ----------------------------------------------------------------

def expert_raw_bytes(m: ModelFacts, tp: int) -> int:
    """One MXFP4 expert as DeepSeekMxfp4MoEMethod.create_weights makes it, one rank.

    w13 [2I/tp, H/2] and w2 [H, I/tp/2] int8 (two E2M1 values a byte), scales
    one fp32 per 32 inputs ([2I/tp, H/32] and [H, I/tp/32]).
    """
    i = m.inter // tp
    return 2 * i * (m.hidden // 2) + m.hidden * (i // 2) + (2 * i * (m.hidden // 32) + m.hidden * (i // 32)) * 4


def expert_e8m0_bytes(m: ModelFacts, tp: int) -> int:
    """The e8m0 scale copy the triton_kernels path makes (its weight view shares the int8 storage)."""
    i = m.inter // tp
    return 2 * i * (m.hidden // 32) + m.hidden * (i // 32)


def resident_expert_bytes(m: ModelFacts, tp: int, threshold: int) -> int:
    """One GPU-resident (partial-layer) expert after loading, one rank.

    mxfp4_deepseek.process_weights_after_loading keeps a partial layer in the
    triton_kernels form on every arch; the raw tensors stay while
    --kt-gpu-prefill-token-threshold > 0 (the full-GPU prefill copies from
    them), otherwise only the int8 storage (shared by the view) and the e8m0
    scales remain.
    """
    if threshold > 0:
        return expert_raw_bytes(m, tp) + expert_e8m0_bytes(m, tp)
    i = m.inter // tp
    return 2 * i * (m.hidden // 2) + m.hidden * (i // 2) + expert_e8m0_bytes(m, tp)


def marlin_layer_bytes(m: ModelFacts, tp: int) -> int:
    """A full layer in Marlin form (v4_marlin_moe.get_v4_mxfp4_marlin_storage_nbytes), one rank.

    w13 [E, H/16, 4I] int32, scales [E, H/32, 2I] e8m0; w2 [E, I/16, 2H]
    int32, scales [E, I/32, H] e8m0 (I per rank).
    """
    e, h, i = m.experts, m.hidden, m.inter // tp
    return e * (h // 16) * (4 * i) * 4 + e * (h // 32) * (2 * i) + e * (i // 16) * (2 * h) * 4 + e * (i // 32) * h


def raw_layer_bytes(m: ModelFacts, tp: int) -> int:
    """A full layer of raw MXFP4 experts (kt_ep_wrapper._mxfp4_raw_slot_storage_nbytes), one rank."""
    return m.experts * expert_raw_bytes(m, tp)


def layerwise_reservation_bytes(m: ModelFacts, tp: int) -> int:
    """What 0.7.2 reserves before sizing the KV cache on the Marlin archs: two raw and two prepared slots."""
    return 2 * (raw_layer_bytes(m, tp) + marlin_layer_bytes(m, tp))


def lazy_slot_bytes(m: ModelFacts, tp: int) -> int:
    """The full layer the KT wrapper allocates at the first long prefill where nothing is reserved."""
    return raw_layer_bytes(m, tp) + m.experts * expert_e8m0_bytes(m, tp)


def draft_bytes(m: ModelFacts, tp: int, marlin: bool, threshold: int) -> int:
    """The EAGLE (NextN) draft on each rank: its layer, e_proj/h_proj, and all its routed experts.

    The draft runs without the KT wrapper, so a full layer of experts sits on
    the GPU: in Marlin form on the Marlin archs (the raw tensors kept while
    the threshold is > 0), in triton_kernels/TRT-LLM form elsewhere. Its
    embedding and head are the main model's (set_embed_and_head).
    """
    ratio = m.compress_ratios[m.layers] if len(m.compress_ratios) > m.layers else 0
    own = layer_bytes(m, ratio, tp) + 2 * _fp8(m.hidden, m.hidden)
    if marlin:
        experts = marlin_layer_bytes(m, tp) + (raw_layer_bytes(m, tp) if threshold > 0 else 0)
    else:
        experts = lazy_slot_bytes(m, tp)
    return own + experts


# --- KV cache ----------------------------------------------------------------------

def swa_ratio(chunk: int, tokens: int, overlap: bool = True) -> float:
    """swa_full_tokens_ratio as server_args sets it for DeepSeek-V4 when both sizes are given."""
    needed = (2 if overlap else 1) * chunk * 1.05
    return min(0.9, max(0.1, needed / tokens))


def kv_bytes_per_token(m: ModelFacts, swa: float, speculative: bool) -> float:
    """DSv4MemoryCalculator.get_bytes_per_full_token (fp8 KV, cc >= 8.9), one rank (MQA: not sharded)."""
    nope = m.head_dim - m.rope_dim
    kv = nope + m.rope_dim * 2 + 8
    indexer = m.index_head_dim + m.index_head_dim // 128 * 4
    c4_ring, c128_ring = (16, 256) if speculative else (8, 128)
    ratios = m.compress_ratios
    n4, n128 = sum(r == 4 for r in ratios), sum(r == 128 for r in ratios)
    c4_state, c128_state = 2 * 2 * m.head_dim * 4, 2 * m.head_dim * 4
    c4_index_state = 2 * 2 * m.index_head_dim * 4
    return (swa * kv * len(ratios) + kv * n4 / 4 + kv * n128 / 128 + indexer * n4 / 4
            + swa * (c4_ring / m.window) * (c4_state + c4_index_state) * n4
            + swa * (c128_ring / m.window) * c128_state * n128)
