"""Stack knowledge in envs/ (model.toml, loaders.toml, cuda.toml, ktkernel.toml): loaded typed, refused when malformed."""

from __future__ import annotations

import pytest

from ktenv import spec as specmod
from ktenv.errors import SpecError


def test_the_committed_knowledge(repo):
    k = specmod.load(repo / "envs").knowledge
    assert k.model.experts.routed == 256 and k.model.experts.top_k == 6 and k.model.experts.layers == 43
    assert k.model.bad_tp[4].evidence == ("kvcache-ai/ktransformers#1998",) and k.model.bad_tp[4].holds("0.7.2")
    assert k.loaders.common_ops_dir("9.0") == "sm90" and k.loaders.common_ops_dir("12.0") == "sm100"
    assert k.loaders.paths[("mxfp4_moe", "trtllm_fp4")].min_flashinfer == "0.6.9"
    assert k.kt_kernel.variants[0] == "amx" and k.kt_kernel.variants[-1] == "avx2"
    assert k.kt_kernel.min_setuptools == (77, 0) and k.min_driver["12.8"] == "570.26"
    assert k.loaders.preload_for("0.7.2")[0] == "torch" and k.loaders.preload_for("0.5.0") == []
    quirks = {(n.tool, n.item): n for n in k.loaders.selfcheck}
    assert quirks[("kt doctor", "sglang")].kind == "quirk" and quirks[("kt doctor", "sglang")].known.holds("0.7.2")
    assert all(n.known.reason for n in k.loaders.selfcheck)


def _break(envs, name, old, new):
    p = envs / name
    text = p.read_text()
    assert old in text, (name, old)
    p.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("name,old,new,message", [
    ("model.toml", 'reason = "sglang-kt', 'why = "sglang-kt', r"model.toml: unknown key\(s\) why in \[\[model.bad_tp\]\] #1"),
    ("loaders.toml", 'fallback = "sglang\'s Triton sparse-MLA decode"\nsymbols = ["flashinfer.mla', 'symbols = ["flashinfer.mla',
     r"loaders.toml: \[paths.sparse_mla.flashinfer_sm120\] is not required but names no `fallback`"),
    ("loaders.toml", 'reason = """IPython', 'evidence = ["x"]\nnotes = """IPython', r"unknown key\(s\) notes in \[import_exempt.matplotlib_inline\]"),
    ("loaders.toml", 'kind = "needs-gpu"', 'kind = "harmless"', r"\[\[selfcheck\]\] #\d+.kind is 'harmless'; it must be one of"),
    ("loaders.toml", "says = '^2/4 installed$'", "says = '^2/4 (installed$'", r"\[\[selfcheck\]\] #3.says is not a regular expression"),
    ("loaders.toml", 'preload = ["torch"', 'modules = ["torch"', r"unknown key\(s\) modules in \[smoke\]"),
    ("ktkernel.toml", 'avx2 = ["avx2"]\n', '', r"ktkernel.toml: \[variants.requires\] must name exactly the variants"),
    ("ktkernel.toml", 'min_cmake = "3.16"', 'min_cmake = "three"', r"\[build\].min_cmake: 'three' is not a version"),
    ("cuda.toml", "[driver.min_linux]", "[driver.min]", r"cuda.toml: unknown key\(s\) min in \[driver\]"),
])
def test_malformed_knowledge_is_refused_naming_file_and_table(envs_copy, name, old, new, message):
    _break(envs_copy, name, old, new)
    with pytest.raises(SpecError, match=message):
        specmod.load(envs_copy)


def test_knowledge_without_a_reason_is_refused(envs_copy):
    _break(envs_copy, "model.toml", 'reason = "sglang-kt\'s DeepSeek-V4 raised NotImplementedError at --tensor-parallel-size 4"\n', "")
    with pytest.raises(SpecError, match=r"\[\[model.bad_tp\]\] #1 has no reason"):
        specmod.load(envs_copy)


def test_a_selfcheck_note_without_a_reason_is_refused(envs_copy):
    _break(envs_copy, "loaders.toml", 'reason = "kt doctor lists GPUs with nvidia-smi, which comes with the NVIDIA driver"\n', "")
    with pytest.raises(SpecError, match=r"\[\[selfcheck\]\] #4 has no reason"):
        specmod.load(envs_copy)
