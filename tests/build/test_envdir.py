"""The env directory: one build per prefix, leftovers cleaned, one-step swaps, foreign directories left alone."""

from __future__ import annotations

import os
import threading
import time

import pytest

from ktenv.build import envdir
from ktenv.errors import KtenvError
from ktenv.lock import model as lockmodel
from ktenv.target import STAMP


from build_helpers import (copy_lock, debris)


def test_edited_lock_is_refused(tmp_path):
    root = copy_lock(tmp_path)
    req = root / "sm90" / "requirements.txt"
    req.write_text(req.read_text().replace("idna==", "idna===", 1))
    with pytest.raises(KtenvError, match="edited after locking"):
        lockmodel.read(root / "sm90").check_hash()




def test_a_held_prefix_fails_with_no_wait_and_queues_without(tmp_path):
    prefix = tmp_path / "env"
    lines = []
    with envdir.BuildLock(prefix):
        with pytest.raises(envdir.BuildBusy, match=rf"Another build of {prefix} is running \(pid {os.getpid()}, started"):
            with envdir.BuildLock(prefix, wait=False):
                pass
        got = threading.Event()

        def second():
            with envdir.BuildLock(prefix, wait=True, progress=lines.append):
                got.set()

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        assert not got.is_set()
        assert lines and lines[0].startswith(f"waiting for another build of {prefix} (pid {os.getpid()}")
    t.join(10)
    assert got.is_set()


def test_leftovers_are_cleaned_and_an_interrupted_swap_is_undone(tmp_path):
    prefix = tmp_path / "env"
    (tmp_path / ".env.ktenv-build-123" / "lib").mkdir(parents=True)
    old = tmp_path / ".env.ktenv-old-456"
    old.mkdir()
    (old / STAMP).write_text("{}")
    removed = envdir.clean_stale(prefix)
    assert (prefix / STAMP).exists()  # the previous env is back where it was
    assert removed == [str(tmp_path / ".env.ktenv-build-123")] and debris(prefix) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_replaces_the_env_in_one_step(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(envdir, "_exchange", lambda a, b: False)
    prefix, new = tmp_path / "env", tmp_path / ".env.ktenv-build-1"
    prefix.mkdir()
    (prefix / "old").write_text("previous")
    new.mkdir()
    (new / "new").write_text("next")
    how = envdir.swap_in(new, prefix)
    assert how == ("exchange" if exchange else "rename-pair")
    assert sorted(p.name for p in prefix.iterdir()) == ["new"] and not new.exists() and debris(prefix) == []


def test_a_directory_ktenv_did_not_build_is_left_alone(tmp_path):
    prefix = tmp_path / "mine"
    prefix.mkdir()
    (prefix / "notes.txt").write_text("do not delete")
    with pytest.raises(KtenvError, match="is not an env ktenv built"):
        envdir.check_replaceable(prefix)
