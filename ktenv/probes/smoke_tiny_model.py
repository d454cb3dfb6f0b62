"""Write a tiny DeepSeek-V4-shaped checkpoint for a dummy-weight server start. Runs INSIDE the env.

    <env>/bin/python smoke_tiny_model.py OUT_DIR [--layers 4 --experts 256 --hidden 512 --intermediate 256]

`sglang.launch_server --load-format dummy` builds the model from config.json
with random weights, but three things still come from the directory:
  config.json          the installed sglang-kt's own DeepSeek-V4 config
                       (sglang/srt/configs/config_backup_small.json, the V4-Flash
                       shape) with the layer count, hidden and expert sizes
                       shrunk; attention geometry (64 heads of 512, LoRA ranks,
                       indexer) and the YaRN rope_scaling are kept, since the
                       kernels are specialised to the one and sglang reads every
                       key of the other (without it: KeyError: 'factor'); the
                       vocabulary is the tokenizer's, so every id the dummy
                       model emits decodes to text
  tokenizer            a byte-level BPE made here with `tokenizers`, carrying
                       the special tokens sglang's DeepSeek-V4 chat encoder emits
  experts              the KT wrapper loads the routed experts from
                       --kt-weight-path even with dummy weights: random MXFP4
                       (E2M1 nibbles + UE8M0 scales) under the checkpoint's names
                       `layers.{L}.ffn.experts.{E}.w{1,3,2}.{weight,scale}`
Each piece is then read back with the code that will read it on the server:
sglang's own get_config (the server's config path) checked against every
field the DeepSeek-V4 path reads (dsv4_fields.py, for the env's
SGLANG_DSV4_MODE), AutoTokenizer, the DeepSeek-V4 chat encoder and
kt-kernel's MXFP4SafeTensorLoader for every layer (the loader prints one line
per layer; the GPU tier looks for those lines in the server log).
Hash-routed layers are turned off (num_hash_layers 0): their token->expert
table is an integer tensor that dummy loading leaves uninitialised.

Prints `KTENV-RESULT {json}` last on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import dsv4_fields  # beside this script

MARK = "KTENV-RESULT "
GROUP = 32  # MXFP4: one UE8M0 scale per 32 inputs
VOCAB_MULTIPLE = 64  # embedding and lm_head kernels like round sizes; the tokenizer is padded up to one
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "DeepSeek-V4 serves with KT-Kernel experts on the CPU and attention on the GPU.",
    "0123456789 + - * / = ( ) [ ] { } < > ; : , . ! ? ' \"",
]


def base_config() -> dict:
    spec = importlib.util.find_spec("sglang")
    path = Path(next(iter(spec.submodule_search_locations))) / "srt" / "configs" / "config_backup_small.json"
    if path.is_file():
        return json.loads(path.read_text())
    from sglang.srt.configs.deepseek_v4 import DeepSeekV4Config

    return DeepSeekV4Config().to_dict()


def make_config(layers: int, experts: int, hidden: int, inter: int, topk: int, vocab: int) -> dict:
    cfg = base_config()
    # The real pattern: two uncompressed layers, then 4/128 alternating; the
    # NextN (MTP) layer is built with its own ratio (compress_ratio_override).
    ratios = ([0, 0] + [4, 128] * layers)[:layers] + [0] * cfg.get("num_nextn_predict_layers", 1)
    cfg.update(
        architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4",
        num_hidden_layers=layers, compress_ratios=ratios, num_hash_layers=0, n_hash_layers=0,
        hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=inter,
        n_routed_experts=experts, num_experts_per_tok=topk,
        n_group=min(cfg.get("n_group", 8), experts), topk_group=min(cfg.get("topk_group", 8), experts),
        vocab_size=vocab, bos_token_id=0, eos_token_id=1,
    )
    # rope_scaling and max_position_embeddings stay as V4-Flash has them: sglang
    # reads rope_scaling's factor, original_max_position_embeddings, beta_fast
    # and beta_slow, and transformers warns when max/original != factor.
    return cfg


def special_tokens() -> list[str]:
    from sglang.srt.entrypoints.openai import encoding_dsv4 as enc

    head = [enc.bos_token, enc.eos_token]  # ids 0 and 1, as config.json says
    found = []
    for value in vars(enc).values():
        vals = value.values() if isinstance(value, dict) else [value]
        for v in vals:
            if isinstance(v, str) and v.startswith("<") and v.endswith(">") and len(v) < 40 and "{" not in v:
                found.append(v)
    return head + sorted(set(found) - set(head))


def make_tokenizer(out: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = special_tokens()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    # Pad to a round size with plain tokens: config.json's vocab_size is this
    # size, so every id the dummy model can emit decodes to text.
    pad = -tok.get_vocab_size() % VOCAB_MULTIPLE
    tok.add_tokens([f"<tiny{i}>" for i in range(pad)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
        "pad_token": specials[1], "add_bos_token": False, "model_max_length": 8192,
        "additional_special_tokens": specials[2:],
    }, indent=1))
    return {"vocab": tok.get_vocab_size(), "special_tokens": len(specials), "padding": pad}


def write_experts(out: Path, layers: int, experts: int, hidden: int, inter: int, seed: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    # UE8M0 127 is 2^0; 120..127 keeps |w| <= 6, like real expert weights' scale.
    for layer in range(layers):
        for e in range(experts):
            for proj, (n, k) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                key = f"layers.{layer}.ffn.experts.{e}.{proj}"
                tensors[key + ".weight"] = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int8)
                tensors[key + ".scale"] = torch.randint(120, 128, (n, k // GROUP), generator=g,
                                                        dtype=torch.uint8).view(torch.float8_e8m0fnu)
    name = "model-experts.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"note": "routed experts only: ktenv smoke, --load-format dummy"},
         "weight_map": {k: name for k in sorted(tensors)}}, indent=0))
    return {"file": name, "tensors": len(tensors), "bytes": (out / name).stat().st_size}


def read_back(out: Path, cfg: dict) -> dict:
    from sglang.srt.entrypoints.openai import encoding_dsv4
    from sglang.srt.utils.hf_transformers_utils import get_config
    from transformers import AutoTokenizer

    # The server's own config path (it may swap in a packaged config first,
    # then reloads the checkpoint's through DeepSeekV4Config).
    c = get_config(str(out), trust_remote_code=True)
    for key in ("num_hidden_layers", "hidden_size", "n_routed_experts", "vocab_size"):
        assert getattr(c, key) == cfg[key], f"sglang's get_config reads {key}={getattr(c, key)}, config.json says {cfg[key]}"
    mode, sub = os.environ.get("SGLANG_DSV4_MODE", "2604"), os.environ.get("SGLANG_DSV4_2604_SUBMODE", "")
    bad = dsv4_fields.problems(c, mode, sub, speculative=True)
    assert not bad, f"config.json field {bad[0]['field']} {bad[0]['problem']}"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1, (tok.bos_token_id, tok.eos_token_id)
    assert len(tok) == cfg["vocab_size"], f"tokenizer has {len(tok)} tokens, config.json vocab_size {cfg['vocab_size']}"
    prompt = "What is the capital of France?"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert tok.decode(ids) == prompt, tok.decode(ids)
    chat = encoding_dsv4.encode_messages([{"role": "user", "content": prompt}], thinking_mode="chat")
    chat_ids = tok.encode(chat, add_special_tokens=False)
    assert chat_ids[0] == 0, "the chat prompt must start with BOS as one token"
    from kt_kernel.utils.loader import MXFP4SafeTensorLoader

    # kt-kernel's NativeMoEWrapper asks for model.layers.{L} and the loader
    # finds the checkpoint's layers.{L}.ffn.experts; every layer, as the server will.
    loader = MXFP4SafeTensorLoader(str(out))
    for layer in range(cfg["num_hidden_layers"]):
        got = loader.load_experts(f"model.layers.{layer}")
        assert len(got["gate"]) == cfg["n_routed_experts"], (layer, len(got["gate"]))
    assert tuple(got["gate"][0].shape) == (cfg["moe_intermediate_size"], cfg["hidden_size"] // 2)
    assert tuple(got["down_scale"][0].shape) == (cfg["hidden_size"], cfg["moe_intermediate_size"] // GROUP)
    return {"prompt": prompt, "prompt_tokens": len(ids), "chat_tokens": len(chat_ids),
            "fields_checked": dsv4_fields.read_fields(mode, sub, speculative=True),
            "kt_layers": list(range(cfg["num_hidden_layers"])), "dsv4_mode": mode, "dsv4_submode": sub}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--topk", type=int, default=6)
    a = ap.parse_args(argv)
    t = time.perf_counter()
    report: dict = {"ok": False, "model": a.out}
    try:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        report["tokenizer"] = make_tokenizer(out)
        cfg = make_config(a.layers, a.experts, a.hidden, a.intermediate, a.topk, report["tokenizer"]["vocab"])
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        report["experts"] = write_experts(out, a.layers, a.experts, a.hidden, a.intermediate)
        report.update(read_back(out, cfg))
        report.update(
            ok=True, gpu_experts=0, n_routed_experts=a.experts,
            summary=(f"{a.layers} layers, {a.experts} experts (top-{a.topk}), hidden {a.hidden}, expert intermediate "
                     f"{a.intermediate}; {report['experts']['bytes'] / 1e6:.0f} MB of random MXFP4 experts; "
                     f"{report['tokenizer']['vocab']}-token tokenizer = vocab_size; read back by sglang's get_config "
                     f"({len(report['fields_checked'])} DeepSeek-V4 fields checked for mode {report['dsv4_mode']}"
                     f"{' ' + report['dsv4_submode'] if report['dsv4_submode'] else ''}, rope_scaling "
                     f"{'/'.join(dsv4_fields.ROPE_KEYS)} included), AutoTokenizer, the DeepSeek-V4 chat encoder "
                     f"and kt-kernel's MXFP4 loader (all {a.layers} layers)"),
        )
    except Exception as e:  # reported; the caller decides
        report.update(error=f"{type(e).__name__}: {e}"[:1500], traceback_tail=traceback.format_exc()[-1500:])
    report["seconds"] = round(time.perf_counter() - t, 2)
    sys.stdout.write("\n" + MARK + json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
