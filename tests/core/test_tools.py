"""ktenv's own tools: the pinned uv (its version decides the bytes of a lock) and the cache directory."""

from __future__ import annotations

import pytest

from ktenv import tools
from ktenv.errors import KtenvError


def test_the_pinned_uv_is_the_one_ktenv_runs():
    assert tools.pinned_uv_version() == tools.check_uv_pin()


def test_another_uv_is_refused_before_it_writes_a_lock(tmp_path):
    fake = tmp_path / "uv"
    fake.write_text("#!/bin/sh\necho 'uv 0.9.13'\n")  # nixos-25.11's uv
    fake.chmod(0o755)
    with pytest.raises(KtenvError, match=r"uv 0.9.13 .* is not the uv 0.13.9 that pyproject.toml pins.*byte-identical"):
        tools.check_uv_pin(str(fake))


def test_the_cache_moves_with_one_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("KTENV_CACHE_DIR", str(tmp_path / "c"))
    assert tools.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KTENV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert tools.cache_dir() == tmp_path / "x" / "ktenv"
