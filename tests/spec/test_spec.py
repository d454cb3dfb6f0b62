"""envs/*.toml: loading, the merge per (arch, stack), and every way the spec can be wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ktenv import spec as specmod
from ktenv.spec import rules
from ktenv.errors import SpecError

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden"


def test_real_spec_loads(repo):
    spec = specmod.load(repo / "envs")
    assert spec.supported_archs() == ["sm89", "sm90", "sm100", "sm120"]
    assert {"sm80", "sm86"} <= set(spec.archs)
    assert spec.stack.default in spec.stack.releases
    for r in spec.rules:
        assert r.reason and r.evidence


@pytest.mark.parametrize("arch,stack", [("sm89", "0.7.2"), ("sm100", "0.7.2"), ("sm120", "0.6.1.post1")])
def test_merge_matches_golden(repo, arch, stack):
    """The resolver inputs for an (arch, stack) are reviewed data: a change shows up here."""
    spec = specmod.load(repo / "envs")
    got = rules.inputs(spec, arch, stack)
    golden = json.loads((GOLDEN / f"inputs-{arch}-{stack}.json").read_text())
    assert json.loads(json.dumps(got.__dict__)) == golden


def test_launch_profile_merge_arch_over_stack(envs_copy):
    (envs_copy / "sm120.toml").write_text((envs_copy / "sm120.toml").read_text().replace("[launch.args]", "[launch.args]\nkt-num-gpu-experts = 60\nport = 31000"))
    spec = specmod.load(envs_copy)
    prof = rules.launch_profile(spec, "sm120")
    assert prof["args"]["kt-num-gpu-experts"] == 60 and prof["args"]["port"] == 31000
    assert prof["args"]["kt-method"] == "MXFP4"  # inherited from the stack
    assert prof["speculative"]["speculative-algorithm"] == "EAGLE"
    assert rules.launch_profile(spec, "sm89")["args"]["kt-num-gpu-experts"] == 144


def test_rule_ranges_follow_the_stack_version(repo):
    spec = specmod.load(repo / "envs")
    old = rules.inputs(spec, "sm89", "0.6.1.post1")
    new = rules.inputs(spec, "sm89", "0.7.2")
    assert "transformers-dataclass-config" in old.rules and "transformers-dataclass-config" not in new.rules
    assert "transformers-kt-owns-transformers" in new.rules and "transformers-kt-owns-transformers" not in old.rules
    assert "transformers==4.57.1" in old.requirements


def test_env_vars_do_not_change_the_input_hash(envs_copy):
    before = rules.inputs(specmod.load(envs_copy), "sm89").digest()
    (envs_copy / "sm89.toml").write_text((envs_copy / "sm89.toml").read_text().replace('TORCH_CUDA_ARCH_LIST = "8.9"', 'TORCH_CUDA_ARCH_LIST = "8.9+PTX"'))
    assert rules.inputs(specmod.load(envs_copy), "sm89").digest() == before


# --- bad input: each a one-paragraph error and a non-zero exit -------------

def test_unknown_arch(cli):
    p = cli("lock", "--arch", "sm75", "--check")
    assert p.returncode == 2
    assert "Unknown arch 'sm75'" in p.stderr and "sm89, sm90, sm100, sm120" in p.stderr and "doctor" in p.stderr


def test_sm80_is_refused_with_its_reason(cli):
    p = cli("lock", "--arch", "sm80")
    assert p.returncode == 3
    assert "not supported" in p.stderr and "fp8e4nv" in p.stderr and "#1978" in p.stderr
    p = cli("explain", "--arch", "sm86")
    assert p.returncode == 3 and "Ampere" in p.stderr


def test_malformed_toml_names_file_and_line(envs_copy, cli):
    text = (envs_copy / "rules.toml").read_text().splitlines()
    lineno = next(i for i, l in enumerate(text) if l.startswith('kind = "override"')) + 1
    text[lineno - 1] = 'kind = "override'  # unterminated string
    (envs_copy / "rules.toml").write_text("\n".join(text) + "\n")
    p = cli("lock", "--arch", "sm89", "--check", "--envs", str(envs_copy))
    assert p.returncode == 2
    assert "rules.toml: malformed TOML" in p.stderr and f"line {lineno}" in p.stderr


def _replace_in_rule(path, rule_id, old, new):
    text = path.read_text()
    start = text.index(f'id = "{rule_id}"')
    end = text.find("[[rule]]", start)
    end = len(text) if end < 0 else end
    block = text[start:end]
    assert old in block
    path.write_text(text[:start] + block.replace(old, new, 1) + text[end:])


def test_rule_without_reason(envs_copy, cli):
    text = (envs_copy / "rules.toml").read_text()
    # drop the reason of tvm-ffi-below-0.1.12 (a one-line reason spanning the triple-quoted block)
    text = re.sub(r'(id = "tvm-ffi-below-0.1.12"(?:.|\n)*?)reason = """(?:.|\n)*?"""\n', r"\1", text, count=1)
    (envs_copy / "rules.toml").write_text(text)
    p = cli("lock", "--arch", "sm89", "--check", "--envs", str(envs_copy))
    assert p.returncode == 2
    assert "rule 'tvm-ffi-below-0.1.12'" in p.stderr and "has no reason" in p.stderr and "line" in p.stderr


def test_contradicting_rules(envs_copy, cli):
    with open(envs_copy / "rules.toml", "a") as f:
        f.write('\n[[rule]]\nid = "old-tilelang"\nkind = "constrain"\npackage = "tilelang"\nspec = "<0.1.5"\n'
                'stack = ">=0.7.0"\nreason = "test"\nevidence = ["test"]\n')
    p = cli("lock", "--arch", "sm89", "--check", "--envs", str(envs_copy))
    assert p.returncode == 2
    assert "contradict each other for tilelang" in p.stderr and "'tilelang-everywhere'" in p.stderr and "'old-tilelang'" in p.stderr


def test_remove_and_require_contradict(envs_copy):
    with open(envs_copy / "rules.toml", "a") as f:
        f.write('\n[[rule]]\nid = "no-tilelang"\nkind = "remove"\npackage = "tilelang"\n'
                'stack = ">=0.7.0"\narchs = ["sm90"]\nreason = "test"\nevidence = ["test"]\n')
    with pytest.raises(SpecError, match="one removes the package and another requires"):
        specmod.load(envs_copy)


def test_unknown_key_is_refused(envs_copy):
    (envs_copy / "sm90.toml").write_text((envs_copy / "sm90.toml").read_text().replace("validated = false", "validated = false\nvalidatd = true"))
    with pytest.raises(SpecError, match="unknown key.*validatd"):
        specmod.load(envs_copy)


def test_unknown_stack_version(cli):
    p = cli("lock", "--arch", "sm89", "--stack", "0.4.0", "--check")
    assert p.returncode == 2 and "Unknown stack version '0.4.0'" in p.stderr and "0.7.2" in p.stderr


def test_unknown_no_rule(cli):
    p = cli("lock", "--arch", "sm89", "--no-rule", "nope", "--check")
    assert p.returncode == 2 and "unknown rule(s) nope" in p.stderr
