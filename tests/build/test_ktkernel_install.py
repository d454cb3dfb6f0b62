"""kt-kernel in an env being built: a source-built wheel put in place of the PyPI one, and refusals of other releases."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktenv.build.ktkernel import install as ktinstall
from ktenv.errors import KtenvError
from ktenv.lock import model as lockmodel

from conftest import REPO

from ktenv import spec as specmod

KT = specmod.load(REPO / "envs").knowledge.kt_kernel

from build_helpers import (LOCK)


def _wheel(path: Path, version: str, files: dict[str, bytes]) -> Path:
    import zipfile

    w = path / f"kt_kernel-{version}-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(w, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"kt_kernel-{version}.dist-info/METADATA", f"Metadata-Version: 2.4\nName: kt-kernel\nVersion: {version}\n")
        z.writestr(f"kt_kernel-{version}.dist-info/RECORD", "")
    return w


def test_a_source_build_replaces_kt_kernel_only(tmp_path):
    from test_patches import make_dist, record_ok

    site = tmp_path / "site"
    di = make_dist(site, "kt-kernel", "0.7.2", files={
        "kt_kernel/__init__.py": b"wheel", "kt_kernel/_kt_kernel_ext_amx.so": b"amx", "kt_kernel/_kt_kernel_ext_avx2.so": b"avx2",
        "sgl_kernel/payload_runtime.py": b"loader", "triton_kernels/__init__.py": b"tk"})
    (site / "kt_kernel/__pycache__").mkdir()
    (site / "kt_kernel/__pycache__/stale.pyc").write_bytes(b"x")
    w = _wheel(tmp_path, "0.7.2", {"kt_kernel/__init__.py": b"source", "kt_kernel/kt_kernel_ext.cpython-311-x86_64-linux-gnu.so": b"native"})
    r = ktinstall.overlay_wheel(site, w)
    assert r["replaced"] == ["kt_kernel"] and r["version"] == "0.7.2"
    assert sorted(p.name for p in (site / "kt_kernel").iterdir()) == ["__init__.py", "kt_kernel_ext.cpython-311-x86_64-linux-gnu.so"]
    assert (site / "kt_kernel/__init__.py").read_bytes() == b"source"
    # what kt-kernel's wheel carries besides kt_kernel/ stays
    assert (site / "sgl_kernel/payload_runtime.py").read_bytes() == b"loader" and (site / "triton_kernels/__init__.py").exists()
    rows = [r.split(",")[0] for r in (di / "RECORD").read_text().splitlines()]
    assert "kt_kernel/_kt_kernel_ext_amx.so" not in rows and "kt_kernel/kt_kernel_ext.cpython-311-x86_64-linux-gnu.so" in rows
    record_ok(site, di)


def test_a_source_build_of_another_release_is_refused(tmp_path):
    from test_patches import make_dist

    site = tmp_path / "site"
    make_dist(site, "kt-kernel", "0.7.2", files={"kt_kernel/__init__.py": b"wheel"})
    w = _wheel(tmp_path, "0.7.0", {"kt_kernel/__init__.py": b"source"})
    with pytest.raises(KtenvError, match=r"built from source is version 0.7.0, but the lock installs 0.7.2.*git checkout v0.7.2"):
        ktinstall.overlay_wheel(site, w)
    assert (site / "kt_kernel/__init__.py").read_bytes() == b"wheel"


def test_a_checkout_of_another_release_is_refused_before_building(tmp_path):
    src = tmp_path / "ktransformers"
    src.mkdir()
    (src / "kt-kernel").mkdir(parents=True)
    (src / "version.py").write_text('"""v"""\n\n__version__ = "0.7.0"\n')
    lock = lockmodel.read(LOCK)  # the committed sm90 lock pins kt-kernel 0.7.2
    with pytest.raises(KtenvError, match=r"is version 0.7.0, but this lock pins kt-kernel 0.7.2.*nothing was built"):
        ktinstall.install(KT, tmp_path / "env", lock, str(src), "avx2", print)
