"""Run flash_mla the way sglang-kt 0.7.2 calls it on Hopper, and check the result against a plain reference.

    python bench/flash_mla_hopper_check.py [--iters 200]

Needs a CUDA GPU of compute capability 9.0 and a flash_mla built for sm_90a
(ktenv/build/flash_mla.py). Standalone: torch and flash_mla only.

The KV cache is laid out as sglang-kt's DeepSeekV4TokenToKVPool writes it
(mem_cache/deepseekv4_memory_pool.py, nsa/index_buf_accessor_v4.py): pages of
uint8, each `block` tokens of [448 fp8 NoPE | 64 bf16 RoPE] (576 bytes) then
`block` x 8 bytes of ue8m0 scales (7 per token + 1 pad), the page padded to a
multiple of 576 bytes; the kernel sees it through the same strided view
(num_pages, block, 1, 584) that deepseek_v4_backend_radix.py forward() makes.
Three caches as in the model: the sliding window (block 128, top-k 128), the
C4 compressed cache (block 64, top-k 512) and the C128 one (block 2, top-k
padded to 64). The call passes exactly sglang's input_dict. The reference
dequantizes the same bytes by the layout above and computes attention with
the sink in float32 (--break-scales writes the scales one tile off and must
fail every case: the comparison can tell a wrong layout). A CUDA graph is captured around a first call (as sglang's
graph capture does) and replayed with other lengths. Prints one line per case
and `name: value` lines last.
"""

from __future__ import annotations

import argparse
import sys

import torch

NOPE, ROPE, TILE = 448, 64, 64
TOKEN_BYTES = NOPE + 2 * ROPE + NOPE // TILE + 1  # 584
D = NOPE + ROPE  # 512 = d_qk = d_v


BREAK_SCALES = False  # --break-scales: write each token's scales one tile off, to show the check catches it


def make_cache(num_pages: int, block: int, gen: torch.Generator):
    """Random K (bf16) quantized into sglang-kt's page layout; returns (the kernel's view, K as stored)."""
    k = (torch.randn(num_pages * block, D, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    nope = k[:, :NOPE].float().view(-1, NOPE // TILE, TILE)
    scale = torch.pow(2, torch.clamp_min(nope.abs().amax(-1) / 448.0, 1e-4).log2().ceil())  # power of two
    q8 = (nope / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(-1, NOPE)
    ue8m0 = (scale.log2() + 127).round().to(torch.uint8)  # biased exponent
    page_bytes = (block * TOKEN_BYTES + 575) // 576 * 576
    buf = torch.zeros(num_pages, page_bytes, dtype=torch.uint8, device="cuda")
    body = buf[:, : block * (NOPE + 2 * ROPE)].view(num_pages, block, NOPE + 2 * ROPE)
    body[:, :, :NOPE] = q8.view(torch.uint8).view(num_pages, block, NOPE)
    body[:, :, NOPE:] = k[:, NOPE:].contiguous().view(torch.uint8).view(num_pages, block, 2 * ROPE)
    scales = buf[:, block * (NOPE + 2 * ROPE): block * TOKEN_BYTES].view(num_pages, block, 8)
    scales[:, :, :7] = ue8m0.view(num_pages, block, 7).roll(1, -1) if BREAK_SCALES else ue8m0.view(num_pages, block, 7)
    # what the kernel reads back, dequantized: K as the cache holds it
    stored = torch.cat([(q8.float().view(-1, 7, TILE) * scale.unsqueeze(-1)).view(-1, NOPE), k[:, NOPE:].float()], -1)
    view = buf[:, : block * TOKEN_BYTES].view(num_pages, block, 1, TOKEN_BYTES)
    return view, stored


def make_indices(b: int, topk: int, tokens: int, gen: torch.Generator):
    lengths = torch.randint(1, topk + 1, (b,), generator=gen, device="cuda", dtype=torch.int32)
    idx = torch.stack([torch.randperm(tokens, generator=gen, device="cuda")[:topk] for _ in range(b)]).to(torch.int32)
    pos = torch.arange(topk, device="cuda").unsqueeze(0)
    idx = torch.where(pos < lengths.unsqueeze(1), idx, torch.full_like(idx, -1))  # padding is -1, as sglang pads
    return idx.unsqueeze(1), lengths  # (b, 1, topk), (b,)


def reference(q, stores, indices, lengths, sink, scale):
    """float32 attention over each query's selected tokens of every cache, then the sink."""
    b, _, h, _ = q.shape
    out = torch.empty(b, h, D, device="cuda")
    for i in range(b):
        ks = []
        for stored, idx, n in zip(stores, indices, lengths):
            sel = idx[i, 0, : int(n[i])]
            ks.append(stored[sel[sel >= 0].long()])
        kk = torch.cat(ks)  # (n, 512): K and V (V is K's first 512 = all of it)
        logits = (q[i, 0].float() @ kk.T) * scale  # (h, n)
        lse = torch.logsumexp(logits, -1, keepdim=True)
        o = torch.softmax(logits, -1) @ kk
        out[i] = o * (torch.exp(lse) / (torch.exp(lse) + torch.exp(sink.unsqueeze(1))))
    return out


def run_case(flash_mla, h: int, b: int, gen: torch.Generator, graph: bool):
    swa_view, swa = make_cache(32, 128, gen)
    c4_view, c4 = make_cache(16, 64, gen)
    c128_view, c128 = make_cache(64, 2, gen)
    results = []
    for name, extra_view, extra, extra_topk in (("c4", c4_view, c4, 512), ("c128", c128_view, c128, 64)):
        q = torch.randn(b, 1, h, D, generator=gen, device="cuda").to(torch.bfloat16)
        sink = torch.randn(h, generator=gen, device="cuda")
        swa_idx, swa_len = make_indices(b, 128, swa_view.shape[0] * 128, gen)
        ex_idx, ex_len = make_indices(b, extra_topk, extra_view.shape[0] * extra_view.shape[1], gen)
        scale = D ** -0.5
        inputs = dict(q=q, k_cache=swa_view, head_dim_v=D, block_table=None, cache_seqlens=None,
                      tile_scheduler_metadata=flash_mla.get_mla_metadata()[0], softmax_scale=scale,
                      is_fp8_kvcache=True, indices=swa_idx, topk_length=swa_len, attn_sink=sink,
                      extra_k_cache=extra_view, extra_indices_in_kvcache=ex_idx, extra_topk_length=ex_len)
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):  # the first call, metadata included, runs inside the capture
                out = flash_mla.flash_mla_with_kvcache(**inputs)[0]
            # new lengths and indices in the same tensors, as sglang copies them before a replay
            new_idx, new_len = make_indices(b, 128, swa_view.shape[0] * 128, gen)
            swa_idx.copy_(new_idx), swa_len.copy_(new_len)
            g.replay()
        else:
            out = flash_mla.flash_mla_with_kvcache(**inputs)[0]
        torch.cuda.synchronize()
        ref = reference(q, (swa, extra), (swa_idx, ex_idx), (swa_len, ex_len), sink, scale)
        got = out.squeeze(1).float()
        err = (got - ref).abs().max().item()
        rel = ((got - ref).norm() / ref.norm()).item()
        ok = bool(torch.isfinite(got).all()) and rel < 2e-2
        results.append(ok)
        print(f"h_q={h} b={b} extra={name} graph={graph}: out {tuple(out.shape)} {out.dtype}, "
              f"max abs err {err:.4f}, rel err {rel:.5f} -> {'ok' if ok else 'MISMATCH'}", flush=True)
    return all(results)


def time_decode(flash_mla, h: int, b: int, iters: int, gen: torch.Generator) -> float:
    swa_view, _ = make_cache(32, 128, gen)
    c4_view, _ = make_cache(16, 64, gen)
    q = torch.randn(b, 1, h, D, generator=gen, device="cuda").to(torch.bfloat16)
    swa_idx, swa_len = make_indices(b, 128, 32 * 128, gen)
    ex_idx, ex_len = make_indices(b, 512, 16 * 64, gen)
    swa_len.fill_(128), ex_len.fill_(512)
    meta = flash_mla.get_mla_metadata()[0]
    call = lambda: flash_mla.flash_mla_with_kvcache(  # noqa: E731
        q=q, k_cache=swa_view, head_dim_v=D, block_table=None, cache_seqlens=None, tile_scheduler_metadata=meta,
        softmax_scale=D ** -0.5, is_fp8_kvcache=True, indices=swa_idx, topk_length=swa_len,
        attn_sink=torch.zeros(h, device="cuda"), extra_k_cache=c4_view, extra_indices_in_kvcache=ex_idx,
        extra_topk_length=ex_len)
    for _ in range(10):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--break-scales", action="store_true", help="a deliberately wrong cache layout: must not match")
    args = ap.parse_args()
    global BREAK_SCALES
    BREAK_SCALES = args.break_scales
    import flash_mla

    cc = torch.cuda.get_device_capability()
    print(f"device {torch.cuda.get_device_name()} cc {cc}; torch {torch.__version__}; flash_mla from {flash_mla.__file__}")
    if cc != (9, 0):
        print(f"flash_mla's SM90 kernels need compute capability 9.0, this GPU is {cc}", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    ok = all([run_case(flash_mla, h, b, gen, graph) for h in (64, 128) for b in (1, 4) for graph in (False, True)])
    if args.break_scales:
        print(f"broken_layout_detected: {'yes' if not ok else 'no'}")
        return 0 if not ok else 1
    for h in (64, 128):
        print(f"decode_us_b1_h{h}_swa128_c4_512: {time_decode(flash_mla, h, 1, args.iters, gen):.1f}")
    print(f"flash_mla_v4_calls_match_reference: {'yes' if ok else 'no'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
