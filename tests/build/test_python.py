"""The interpreter an env is built with: found for the lock, named when absent, identified by its base prefix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ktenv.build.python import find_python, identity
from ktenv.build.sync import uv_env
from ktenv.errors import KtenvError
from ktenv.tools import uv_bin


from build_helpers import (ABSENT_PYTHON)


def test_missing_python_is_named():
    v = ABSENT_PYTHON
    with pytest.raises(KtenvError, match=rf"No interpreter found for Python {v}: the lock was made for Python {v}.*pass --python"):
        find_python([v])


def test_python_of_the_wrong_version_is_refused():
    mine = "%d.%d" % sys.version_info[:2]
    other = "3.12" if mine != "3.12" else "3.11"
    with pytest.raises(KtenvError, match=rf"is Python {mine}, but this lock was made for Python {other}"):
        find_python([other], sys.executable)


def test_python_is_found_for_the_lock():
    mine = "%d.%d" % sys.version_info[:2]
    path, version = find_python(["3.99", mine])
    assert version == mine and Path(path).exists()




def test_identity_names_the_base_interpreter(tmp_path):
    """A venv's python reports the interpreter it was made from: what the stamp compares."""
    subprocess.run([uv_bin(), "venv", "-q", "--python", sys.executable, str(tmp_path / "v")], check=True, env=uv_env())
    mine = identity(sys.executable)
    theirs = identity(tmp_path / "v" / "bin" / "python")
    assert theirs["base_prefix"] == mine["base_prefix"] == sys.base_prefix
    assert theirs["version"] == "%d.%d.%d" % sys.version_info[:3]
