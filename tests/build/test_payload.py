"""ktenv.payload: sgl-kernel's CUDA payload joined, checked, cached by content and placed in the env.

Fast tests build a real payload in sgl-kernel's format (a tar.gz cut into
parts, each in its own carrier package owned by a distribution's RECORD, and
a manifest) and run the real code over it. Slow tests use an env synced from
lock/sm90: the real 1.3 GB payload, the env's own loader as the judge, and
the source patch that makes the loader use it on a nearly full disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from ktenv.build import dists, patches, payload
from ktenv.build.payload import PayloadError

from conftest import sync_raw_env

from test_patches import make_dist

REPO = Path(__file__).resolve().parents[2]

FILES = {
    "sgl_kernel/flash_ops.abi3.so": os.urandom(300_000),
    "sgl_kernel/sm100/common_ops.abi3.so": os.urandom(500_000),
    "sgl_kernel_kt.libs/libnuma-1.so.1.0.0": b"libnuma" * 1000,
}
MODULES = ("sgl_kernel_kt_payload_core", "sglang_kt_sgl_kernel_payload", "ktransformers_sgl_kernel_payload")
CARRIERS = {"sgl_kernel_kt_payload_core": ("kt-kernel", "0.7.2"), "sglang_kt_sgl_kernel_payload": ("sglang-kt", "0.7.2"),
            "ktransformers_sgl_kernel_payload": ("ktransformers", "0.7.2")}


def _archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        extra = tarfile.TarInfo("sgl_kernel/README")  # not in the manifest: must not be extracted
        extra.size = 2
        tar.addfile(extra, io.BytesIO(b"hi"))
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE = _archive()


def make_site(root: Path, drop: str | None = None, corrupt: bool = False, file_hashes: dict | None = None) -> Path:
    """A site-packages laid out like an env of the 0.7.2 stack, with a small payload."""
    site = root / "site-packages"
    cut = len(ARCHIVE) // 3
    pieces = [ARCHIVE[:cut], ARCHIVE[cut:2 * cut], ARCHIVE[2 * cut:]]
    if corrupt:
        pieces[1] = bytes([pieces[1][0] ^ 0xFF]) + pieces[1][1:]
    hashes = file_hashes or {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}
    manifest = (f"VERSION = '0.3.21.post2'\nARCHIVE_SHA256 = '{hashlib.sha256(ARCHIVE).hexdigest()}'\n"
                f"PAYLOAD_MODULES = {MODULES!r}\nFILES = {hashes!r}\n"
                "BINARIES = {'flash_ops.abi3.so': 'sgl_kernel/flash_ops.abi3.so'}\n")
    for module, piece in zip(MODULES, pieces):
        dist, version = CARRIERS[module]
        files = {} if module == drop else {f"{module}/__init__.py": b"", f"{module}/payload.part": piece}
        if dist == "kt-kernel":
            files["sgl_kernel/_payload_manifest.py"] = manifest.encode()
        if module != drop or dist == "kt-kernel":
            make_dist(site, dist, version, files=files)
    return site


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def test_payload_is_extracted_checked_and_linked(tmp_path, cache):
    site = make_site(tmp_path / "a")
    r = payload.materialize(site, cache=cache)
    assert r["present"] and not r["cache_hit"] and r["placed_by"] == "hardlink"
    assert [p["distribution"] for p in r["parts"]] == ["kt-kernel", "sglang-kt", "ktransformers"]
    dest = payload.runtime_dir(site, payload.read_manifest(site))
    assert dest == site / "sgl_kernel/_payload_cache/sgl-kernel-kt/0.3.21.post2" / hashlib.sha256(ARCHIVE).hexdigest()[:16]
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    assert not (dest / "sgl_kernel/README").exists()
    entry = cache / hashlib.sha256(ARCHIVE).hexdigest()
    assert (dest / "sgl_kernel/flash_ops.abi3.so").stat().st_ino == (entry / "sgl_kernel/flash_ops.abi3.so").stat().st_ino
    assert not os.access(entry / "sgl_kernel/flash_ops.abi3.so", os.W_OK) or os.geteuid() == 0
    assert (entry / "sgl_kernel/flash_ops.abi3.so").stat().st_mode & 0o222 == 0


def test_a_second_env_shares_the_cache(tmp_path, cache):
    payload.materialize(make_site(tmp_path / "a"), cache=cache)
    site_b = make_site(tmp_path / "b")
    r = payload.materialize(site_b, cache=cache)
    assert r["cache_hit"] and r["placed_by"] == "hardlink"
    assert (Path(r["dir"]) / "sgl_kernel/sm100/common_ops.abi3.so").read_bytes() == FILES["sgl_kernel/sm100/common_ops.abi3.so"]


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, cache):
    payload.materialize(make_site(tmp_path / "a"), cache=cache)
    victim = cache / hashlib.sha256(ARCHIVE).hexdigest() / "sgl_kernel/flash_ops.abi3.so"
    victim.unlink()
    victim.write_bytes(b"short")
    r = payload.materialize(make_site(tmp_path / "b"), cache=cache)
    assert not r["cache_hit"]
    assert (Path(r["dir"]) / "sgl_kernel/flash_ops.abi3.so").read_bytes() == FILES["sgl_kernel/flash_ops.abi3.so"]


def test_leftovers_of_a_killed_extraction_are_removed(tmp_path, cache):
    stale = cache / f".tmp-{hashlib.sha256(ARCHIVE).hexdigest()[:16]}-99999"
    stale.mkdir(parents=True)
    (stale / "half.so").write_bytes(b"x")
    payload.materialize(make_site(tmp_path / "a"), cache=cache)
    assert not stale.exists()


def test_a_missing_carrier_names_its_distribution(tmp_path, cache):
    site = make_site(tmp_path / "a", drop="ktransformers_sgl_kernel_payload")
    with pytest.raises(PayloadError, match="`ktransformers_sgl_kernel_payload` should come from the ktransformers wheel, but ktransformers is not installed"):
        payload.materialize(site, cache=cache)
    assert not cache.exists() or not any(cache.glob(hashlib.sha256(ARCHIVE).hexdigest()))


def test_a_carrier_installed_without_its_part_is_out_of_step(tmp_path, cache):
    site = make_site(tmp_path / "a")
    shutil.rmtree(site / "sglang_kt_sgl_kernel_payload")
    with pytest.raises(PayloadError, match="sglang-kt 0.7.2 is installed but does not carry it"):
        payload.materialize(site, cache=cache)


def test_the_core_part_is_expected_with_the_manifest(tmp_path, cache):
    site = make_site(tmp_path / "a")
    shutil.rmtree(site / "sgl_kernel_kt_payload_core")
    with pytest.raises(PayloadError, match="`sgl_kernel_kt_payload_core` should come from the kt-kernel wheel"):
        payload.materialize(site, cache=cache)


def test_parts_from_different_releases_are_refused(tmp_path, cache):
    site = make_site(tmp_path / "a", corrupt=True)
    with pytest.raises(PayloadError, match="different releases|does not match"):
        payload.materialize(site, cache=cache)
    entry = cache / hashlib.sha256(ARCHIVE).hexdigest()
    assert not entry.exists() and not list(cache.glob(".tmp-*"))
    assert not (site / "sgl_kernel/_payload_cache").exists()


def test_a_file_that_does_not_match_the_manifest_is_refused(tmp_path, cache):
    hashes = {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}
    hashes["sgl_kernel/flash_ops.abi3.so"] = "0" * 64
    site = make_site(tmp_path / "a", file_hashes=hashes)
    with pytest.raises(PayloadError, match="flash_ops.abi3.so in the sgl-kernel payload does not match"):
        payload.materialize(site, cache=cache)


def test_no_manifest_means_no_payload(tmp_path, cache):
    site = tmp_path / "site-packages"
    site.mkdir()
    assert payload.materialize(site, cache=cache) == {"present": False}


def test_manifest_is_read_without_importing(tmp_path):
    site = make_site(tmp_path / "a")
    m = payload.read_manifest(site)
    assert m.modules == MODULES and m.version == "0.3.21.post2" and m.binaries == {"flash_ops.abi3.so": "sgl_kernel/flash_ops.abi3.so"}


# ---------------------------------------------------------------- the real payload

@pytest.fixture(scope="module")
def real_env(tmp_path_factory):
    env = sync_raw_env(tmp_path_factory.mktemp("payload") / "env")
    yield env
    shutil.rmtree(env.parent, ignore_errors=True)  # ~10 GB of (mostly hard-linked) files


def shared_cache() -> Path:
    # Content-addressed and verified on use, so sharing one between test runs is
    # exactly what it is for; it saves a 1.3 GB extraction per run.
    return Path(os.environ.get("KTENV_TEST_CACHE", Path("/tmp") / "ktenv-test-cache")) / "payload"


@pytest.mark.slow
@pytest.mark.network
def test_real_payload_is_found_by_the_envs_own_loader(real_env):
    site = dists.site_packages(real_env)
    r = payload.materialize(site, cache=shared_cache())
    assert r["version"] and r["bytes"] > 1_000_000_000
    assert [p["distribution"] for p in r["parts"]] == ["kt-kernel", "transformers-kt", "sglang-kt", "ktransformers", "accelerate-kt"]
    check = payload.verify_in_env(real_env / "bin/python", site)
    assert check["ok"] and Path(check["root"]) == payload.runtime_dir(site, payload.read_manifest(site))

    # Take one file away: the loader would extract again at server start, and the probe says so.
    victim = Path(r["dir"]) / "sgl_kernel/flash_ops.abi3.so"
    victim.unlink()
    try:
        with pytest.raises(PayloadError, match="would not use the payload ktenv placed"):
            payload.verify_in_env(real_env / "bin/python", site)
    finally:
        os.link(Path(r["cache"]) / "sgl_kernel/flash_ops.abi3.so", victim)


@pytest.mark.slow
@pytest.mark.network
def test_real_missing_carrier_is_a_build_error(real_env, tmp_path):
    site = dists.site_packages(real_env)
    part = site / "ktransformers_sgl_kernel_payload"
    moved = tmp_path / "moved"
    shutil.move(part, moved)  # the env's files are hard links into uv's cache: moving does not touch the cache
    try:
        with pytest.raises(PayloadError, match="should come from the ktransformers wheel, but ktransformers 0.7.2 is installed but does not carry it"):
            payload.materialize(site, cache=shared_cache())
    finally:
        shutil.move(moved, part)


@pytest.mark.slow
@pytest.mark.network
def test_payload_patch_on_full_disk(real_env, tmp_path):
    """sgl_kernel's loader ignores a ready payload on a disk with < 4 GB free; the shipped patch fixes that.

    The real payload_runtime.py (before and after patches/sgl-kernel-payload.toml)
    runs over a small payload on a 64 MB tmpfs, with HOME, XDG_CACHE_HOME and
    TMPDIR there too, so every place the loader may pick is short of space.
    """
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)")
    try:
        site = dists.site_packages(real_env)
        original = (site / "sgl_kernel/payload_runtime.py").read_bytes()
        spec = next(p for p in patches.load_patches(REPO / "patches") if p.id == "payload-prefer-packaged")
        assert hashlib.sha256(original).hexdigest() == spec.sha256, "the env's payload_runtime.py is not the one the patch is for"
        results = {}
        for label in ("upstream", "patched"):
            root = mnt / label
            small = make_site(root)
            (small / "sgl_kernel").mkdir(exist_ok=True)
            (small / "sgl_kernel/payload_runtime.py").write_bytes(original)
            if label == "patched":
                di = dists.installed(small)["kt-kernel"].dist_info
                # the runtime file must be in kt-kernel's RECORD for the patch machinery to own it
                with open(di / "RECORD", "a") as f:
                    f.write(f"sgl_kernel/payload_runtime.py,{dists.b64_digest(original)},{len(original)}\n")
                patches.apply(small, [], [spec], "0.7.2")
            payload.materialize(small, cache=root / "cache")
            env = dict(os.environ, HOME=str(root / "home"), XDG_CACHE_HOME=str(root / "xdg"), TMPDIR=str(root / "tmp"))
            env.pop("SGL_KERNEL_KT_CACHE_DIR", None)
            (root / "tmp").mkdir()
            code = ("import sys, types; p = types.ModuleType('sgl_kernel'); p.__path__ = [sys.argv[1] + '/sgl_kernel']; "
                    "sys.modules['sgl_kernel'] = p; import sgl_kernel.payload_runtime as r; "
                    "print(r.materialize_binary('flash_ops.abi3.so'))")
            results[label] = subprocess.run([str(real_env / "bin/python"), "-c", code, str(small)], capture_output=True, text=True, env=env)
        assert results["upstream"].returncode != 0
        assert "No writable sgl-kernel-kt payload cache" in results["upstream"].stderr
        assert "insufficient free space" in results["upstream"].stderr
        assert results["patched"].returncode == 0, results["patched"].stderr
        assert results["patched"].stdout.strip().startswith(str(mnt / "patched" / "site-packages" / "sgl_kernel" / "_payload_cache"))
    finally:
        subprocess.run(["umount", str(mnt)])
