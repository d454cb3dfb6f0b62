"""`lock`, `lock --check` and `explain` against the real index (PyPI) and uv.

Resolution tests are marked `network`: each runs the real uv against PyPI
(~3-10 s with a warm uv cache).
"""

from __future__ import annotations

import shutil

from packaging.version import Version

import pytest

from ktenv import spec as specmod
from ktenv.lock import model as lockfile
from ktenv.lock import resolve
from ktenv.spec import rules
from ktenv.errors import ResolveError
from ktenv.lock.model import Entry, parse_requirements


def _pins(path):
    return {e.name: e.version for e in parse_requirements(path.read_text())}


# --- offline: the committed locks ------------------------------------------

def test_committed_locks_are_up_to_date(cli):
    p = cli("lock", "--all", "--check")
    assert p.returncode == 0, p.stderr
    for arch in ("sm89", "sm90", "sm100", "sm120"):
        assert f"{arch}: up to date" in p.stdout


def test_committed_locks_carry_the_fix(repo):
    for arch in ("sm89", "sm90", "sm100", "sm120"):
        lock = lockfile.read(repo / "lock" / arch)
        pins = _pins(lock.requirements)
        fi, cubin = pins["flashinfer-python"], pins["flashinfer-cubin"]
        assert fi == cubin and Version(fi) >= Version("0.6.9")
        assert "transformers" not in pins and "transformers-kt" in pins
        assert "tilelang" in pins and Version(pins["apache-tvm-ffi"]) < Version("0.1.12")
        assert pins["ktransformers"] == pins["sglang-kt"] == pins["kt-kernel"] == lock.stack
        # every entry is hash-pinned
        assert all(e.hashes for e in parse_requirements(lock.requirements.read_text()))
        assert set(lock.python) == {"3.11", "3.12"}


def test_check_notices_a_changed_input(envs_copy, repo, tmp_path, cli):
    shutil.copytree(repo / "lock", tmp_path / "lock")
    (envs_copy / "rules.toml").write_text((envs_copy / "rules.toml").read_text().replace('spec = "<0.1.12"', 'spec = "<0.1.11"'))
    p = cli("lock", "--arch", "sm90", "--check", "--envs", str(envs_copy), "--lock-dir", str(tmp_path / "lock"))
    assert p.returncode == 1
    assert "stale" in p.stderr and "constraints: added apache-tvm-ffi<0.1.11" in p.stderr
    assert "python build.py lock --arch sm90" in p.stderr


def test_check_notices_a_hand_edit(repo, tmp_path, cli):
    shutil.copytree(repo / "lock", tmp_path / "lock")
    req = tmp_path / "lock" / "sm120" / "requirements.txt"
    req.write_text(req.read_text().replace("tqdm==", "tqdm===", 1))
    p = cli("lock", "--arch", "sm120", "--check", "--lock-dir", str(tmp_path / "lock"))
    assert p.returncode == 1 and "edited by hand" in p.stderr


def test_check_without_a_lock(tmp_path, cli):
    p = cli("lock", "--arch", "sm89", "--check", "--lock-dir", str(tmp_path))
    assert p.returncode == 2 and "No lock in" in p.stderr and "python build.py lock --arch sm89" in p.stderr


def test_explain_lists_rules_and_departures(cli):
    p = cli("explain", "--arch", "sm100")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for rid in ("flashinfer-lockstep", "cutlass-dsl-cascade", "tilelang-everywhere", "tvm-ffi-below-0.1.12"):
        assert rid in out
    assert "why:" in out and "evidence:" in out and "#2106" in out
    assert "sglang-kt==0.7.2 declares flashinfer_python==0.6.3" in out
    assert "quack-kernels==0.2.4 declares nvidia-cutlass-dsl<4.4.0,>=4.3.4" in out
    assert "trtllm_fp4" in out  # sm100's MoE path


def test_explain_json(cli):
    import json

    p = cli("explain", "--arch", "sm89", "--json")
    rep = json.loads(p.stdout)
    assert rep["lock_state"] == "up to date"
    assert {d["rule"] for d in rep["departures"]} <= {r["id"] for r in rep["rules"]}


# --- pure pieces -------------------------------------------------------------

def test_merge_marks_what_differs_between_pythons():
    a = [Entry("numpy", "2.4.6", ["sha256:a"], ["torch"]), Entry("tqdm", "4.70.1", ["sha256:t"], ["(root)"])]
    b = [Entry("numpy", "2.5.5", ["sha256:b"], ["torch"]), Entry("tqdm", "4.70.1", ["sha256:t"], ["(root)"])]
    merged = resolve.merge({"3.11": a, "3.12": b})
    assert [(e.name, e.version, e.marker) for e in merged] == [
        ("numpy", "2.4.6", 'python_version == "3.11"'),
        ("numpy", "2.5.5", 'python_version == "3.12"'),
        ("tqdm", "4.70.1", ""),
    ]
    text = lockfile.render_requirements(rules.Inputs("sm89", "0.7.2", ["3.11", "3.12"], "p", "t", "u", "12.8", "cu128", [], [], []), merged)
    assert 'numpy==2.5.5 ; python_version == "3.12" \\' in text
    assert [(e.name, e.version, e.marker) for e in parse_requirements(text)] == [(e.name, e.version, e.marker) for e in merged]


def test_a_cuda13_runtime_is_refused(repo):
    spec = specmod.load(repo / "envs")
    inputs = rules.inputs(spec, "sm89")
    bad = [Entry("nvidia-cuda-runtime", "13.4.92", ["sha256:x"], ["cuda-toolkit"])]
    with pytest.raises(ResolveError, match="CUDA 13 runtime into a CUDA 12.8 stack"):
        resolve.check_answer(bad, inputs)
    with pytest.raises(ResolveError, match="built for CUDA 13"):
        resolve.check_answer([Entry("nvidia-cublas-cu13", "13.1", ["sha256:x"], ["torch"])], inputs)


def test_recorded_uv_refusal_is_explained(repo):
    """A refusal uv printed on this machine, explained without the network."""
    spec = specmod.load(repo / "envs")
    inputs = rules.inputs(spec, "sm89", disabled=("cutlass-dsl-cascade",))
    stderr = (repo / "tests" / "fixtures" / "uv" / "cutlass-collision.txt").read_text()
    msg = resolve.explain_failure(stderr, spec, inputs, ("cutlass-dsl-cascade",), "3.11")
    assert "collision on nvidia-cutlass-dsl" in msg
    assert "quack-kernels==0.2.4 needs nvidia-cutlass-dsl>=4.3.4,<4.4.0" in msg
    assert "'cutlass-dsl-cascade'" in msg and "disabled by --no-rule" in msg
    assert len(msg.splitlines()) < 12  # a few lines, not a resolver dump


# --- network: real resolutions -------------------------------------------

@pytest.mark.network
def test_lock_is_byte_identical_and_matches_the_committed_one(repo, tmp_path, cli):
    """Two fresh resolutions (no earlier lock to prefer) agree byte for byte, and with lock/sm90."""
    outs = []
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        p = cli("lock", "--arch", "sm90", "--out", str(out))
        assert p.returncode == 0, p.stderr
        outs.append(out)
    for name in ("requirements.txt", "lock.toml"):
        a, b = (o / name for o in outs)
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() == (repo / "lock" / "sm90" / name).read_bytes()


@pytest.mark.network
def test_failed_resolution_is_explained(cli, tmp_path):
    p = cli("lock", "--arch", "sm89", "--no-rule", "cutlass-dsl-cascade", "--out", str(tmp_path / "x"))
    assert p.returncode == 2
    err = p.stderr
    assert "collision on nvidia-cutlass-dsl" in err
    assert "quack-kernels==0.2.4 needs nvidia-cutlass-dsl>=4.3.4,<4.4.0" in err
    assert "flashinfer-python==" in err and "sglang-kt" in err
    assert "Rerun without --no-rule" in err
    assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.network
def test_two_stack_versions_make_rule_ranges_real(cli, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    p = cli("lock", "--arch", "sm89", "--stack", "0.6.1.post1", "--out", str(old))
    assert p.returncode == 0, p.stderr
    p = cli("lock", "--arch", "sm89", "--stack", "0.6.4", "--out", str(new))
    assert p.returncode == 0, p.stderr
    o, n = _pins(old / "requirements.txt"), _pins(new / "requirements.txt")
    # 0.6.1.x: dataclass config -> upstream transformers 4.57.1, no transformers-kt
    assert o["transformers"] == "4.57.1" and "transformers-kt" not in o
    # 0.6.4: transformers-kt owns transformers/; upstream transformers removed
    assert "transformers" not in n and "transformers-kt" in n
    # tilelang was undeclared before 0.7.2 and tvm-ffi unpinned: the rules add/narrow them
    for pins in (o, n):
        assert "tilelang" in pins and Version(pins["apache-tvm-ffi"]) < Version("0.1.12")
    meta = lockfile.read(new)
    assert any(d.package == "transformers" and d.rule == "transformers-kt-owns-transformers" for d in meta.departures)


@pytest.mark.network
def test_offline_run_that_needs_the_network(cli, tmp_path, repo):
    # No earlier lock: the lockstep rule must ask the index.
    p = cli("lock", "--arch", "sm89", "--offline", "--out", str(tmp_path / "a"))
    assert p.returncode == 2 and "--offline" in p.stderr and "Rerun without --offline" in p.stderr
    # An earlier lock, but an empty uv cache: uv itself needs the index.
    shutil.copytree(repo / "lock" / "sm89", tmp_path / "b")
    p = cli("lock", "--arch", "sm89", "--offline", "--out", str(tmp_path / "b"), env={"UV_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert p.returncode == 2 and "needs the package index" in p.stderr and "--offline" in p.stderr


@pytest.mark.network
def test_upgrade_re_resolves_within_the_spec(repo, tmp_path, cli):
    """--upgrade ignores the current pins; inside the same cut-off the answer is the same.

    A lock whose pins were moved by hand (but still inside the spec) is moved
    back by --upgrade, while a plain relock keeps a pin it prefers.
    """
    shutil.copytree(repo / "lock" / "sm89", tmp_path / "sm89")
    req = tmp_path / "sm89" / "requirements.txt"
    old = _pins(req)
    assert old["certifi"] != "2025.8.3"
    # Pretend an earlier lock had chosen an older certifi: without --upgrade uv keeps preferring it.
    text = req.read_text().replace(f"certifi=={old['certifi']}", "certifi==2025.8.3", 1)
    req.write_text(text)
    p = cli("lock", "--arch", "sm89", "--out", str(tmp_path / "sm89"))
    assert p.returncode == 0, p.stderr
    assert _pins(req)["certifi"] == "2025.8.3"
    p = cli("lock", "--arch", "sm89", "--out", str(tmp_path / "sm89"), "--upgrade")
    assert p.returncode == 0, p.stderr
    assert req.read_bytes() == (repo / "lock" / "sm89" / "requirements.txt").read_bytes()
