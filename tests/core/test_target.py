"""One target from the arguments or from an env's stamp: which stack, lock and prefix a command is about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ktenv import spec as specmod
from ktenv import target
from ktenv.errors import KtenvError, SpecError

from conftest import REPO

SPEC = specmod.load(REPO / "envs")


def fake_env(prefix: Path, **stamp) -> Path:
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").write_text("")
    (prefix / target.STAMP).write_text(json.dumps(stamp))
    return prefix


def test_defaults_follow_the_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = target.resolve(SPEC, "sm89", lock_root="lock")
    assert t.stack == SPEC.stack.default and t.lock_dir == Path("lock/sm89")
    assert t.prefix == tmp_path / ".envs" / "sm89" and not t.built
    with pytest.raises(KtenvError, match=r"There is no environment for sm89 at .*Build it first: python build.py env --arch sm89\."):
        t.require_env()


def test_another_stack_locks_and_builds_elsewhere(tmp_path):
    t = target.resolve(SPEC, "sm89", stack="0.6.4", lock_root=REPO / "lock", prefix=tmp_path / "env")
    assert t.lock_dir == REPO / "lock" / "stack-0.6.4" / "sm89"
    assert t.build_hint() == f"python build.py env --arch sm89 --stack 0.6.4 --prefix {tmp_path / 'env'}"


def test_a_built_env_is_checked_against_what_it_was_built_from(tmp_path):
    env = fake_env(tmp_path / "env", arch="sm89", stack="0.6.4", lock_dir=str(REPO / "lock" / "stack-0.6.4" / "sm89"))
    t = target.resolve(SPEC, "sm89", lock_root=REPO / "lock", prefix=env)
    assert t.stack == "0.6.4" and t.lock_dir == REPO / "lock" / "stack-0.6.4" / "sm89" and t.built
    assert t.lock.stack == "0.6.4"
    # `env` builds what it is asked for, whatever is there now.
    assert target.resolve(SPEC, "sm89", lock_root=REPO / "lock", prefix=env, follow_stamp=False).stack == SPEC.stack.default


def test_a_contradicting_stack_or_arch_is_refused(tmp_path):
    env = fake_env(tmp_path / "env", arch="sm89", stack="0.6.4")
    with pytest.raises(KtenvError, match=r"built from stack 0.6.4, but --stack 0.7.2 was asked for.*--stack 0.7.2"):
        target.resolve(SPEC, "sm89", stack="0.7.2", prefix=env)
    with pytest.raises(KtenvError, match=r"was built for sm89, not sm120"):
        target.resolve(SPEC, "sm120", prefix=env)


def test_unknown_and_unsupported_archs_are_refused_with_the_reason():
    with pytest.raises(SpecError, match="Unknown arch 'sm75'"):
        target.resolve(SPEC, "sm75")
    with pytest.raises(SpecError, match="fp8") as e:
        target.resolve(SPEC, "sm80")
    assert e.value.exit_code == 3
