"""`env --check` and `env --repair`: every file of an env against its RECORD and the payload manifest.

Fast tests lay out real distributions (dist-info with a truthful RECORD,
files hard-linked from a cache directory the way uv installs them) and break
them on purpose. Slow tests break an env that ktenv built (the issue's cases:
a deleted payload object, a deleted libnvrtc.so.12, a renamed file, a file
written in place through its hard link into uv's cache) and repair it with
the real CLI: uv, the lock's hashes, the patches and the payload.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ktenv.build import payload, repair, verify
from ktenv.build.dists import site_packages
from ktenv.target import STAMP
from ktenv.tools import uv_bin

from build_helpers import CACHE_ENV, env_cli
from conftest import REPO, run_cli
from test_patches import make_dist
from test_payload import FILES, make_site


# ---------------------------------------------------------------- fast: real files, real RECORDs

def make_env(root: Path, dists: dict[str, dict[str, bytes]], cache: Path | None = None) -> Path:
    """An env prefix with these distributions; with `cache`, their files are hard links into it (as uv installs)."""
    site = root / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    for name, files in dists.items():
        make_dist(site, name, "1.0", files=files)
        if cache is not None:
            for rel in files:
                keep = cache / name / rel
                keep.parent.mkdir(parents=True, exist_ok=True)
                os.link(site / rel, keep)
    stamp(root)
    return root


def stamp(prefix: Path) -> None:
    """The part of a build's stamp the check reads: the dist-info directories it built."""
    site = site_packages(prefix)
    (prefix / STAMP).write_text(json.dumps({"dists": sorted(p.name for p in site.glob("*.dist-info"))}))


def damaged(report: dict) -> dict[str, list[tuple[str, str]]]:
    return {d["name"]: [(f["path"], f["problem"]) for f in d["files"]] for d in report["damaged"]}


def write_in_place(path: Path, keep_mtime: bool = False) -> None:
    """Change one byte without changing the size or the inode (as `open(p, "r+b")` does)."""
    st = path.stat()
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0x20]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


ALPHA = {"alpha/__init__.py": b"from .core import f\n", "alpha/core.py": b"def f():\n    return 1\n" * 50,
         "alpha/data/x,y.json": b'{"comma": "in the name, so RECORD quotes it"}'}
BETA = {"beta/__init__.py": b"", "shared/__init__.py": b"# identical in two wheels\n"}
GAMMA = {"gamma.py": b"G = 1\n", "shared/__init__.py": b"# identical in two wheels\n"}


def test_an_intact_env_checks_clean(tmp_path):
    prefix = make_env(tmp_path / "env", {"alpha": ALPHA, "beta": BETA, "gamma": GAMMA})
    r = verify.check(prefix)
    assert r["ok"] and r["damaged"] == [] and r["files"] == 9  # 7 files + 3 METADATA, one path listed twice
    assert r["hashed"] == 1  # only the path two distributions list is hashed: its owners may disagree
    assert (prefix / verify.INDEX).is_file()
    assert verify.check(prefix, deep=True)["hashed"] == 9
    assert "intact" in verify.render(r)


def test_missing_resized_and_changed_files_are_found(tmp_path):
    prefix = make_env(tmp_path / "env", {"alpha": ALPHA, "beta": BETA})
    site = site_packages(prefix)
    (site / "alpha/data/x,y.json").unlink()
    with open(site / "beta/__init__.py", "ab") as f:
        f.write(b"import os\n")
    write_in_place(site / "alpha/core.py")  # same size, newer mtime: the stat pass sends it to be hashed
    r = verify.check(prefix)
    assert not r["ok"]
    assert damaged(r) == {
        "alpha": [("alpha/core.py", "content differs (sha256)"), ("alpha/data/x,y.json", "missing")],
        "beta": [("beta/__init__.py", "size 10, expected 0")],
    }
    text = verify.render(r, "python build.py env --arch sm90")
    assert "DAMAGED: 2 distribution(s)" in text and "python build.py env --arch sm90 --repair" in text


def test_a_same_size_edit_with_its_old_mtime_needs_deep(tmp_path):
    prefix = make_env(tmp_path / "env", {"alpha": ALPHA})
    write_in_place(site_packages(prefix) / "alpha/core.py", keep_mtime=True)
    assert verify.check(prefix)["ok"]  # size and mtime as built: the stat pass cannot tell
    assert damaged(verify.check(prefix, deep=True)) == {"alpha": [("alpha/core.py", "content differs (sha256)")]}


def test_hard_links_tell_a_replaced_file_and_an_in_place_write(tmp_path):
    cache = tmp_path / "cache"
    prefix = make_env(tmp_path / "env", {"alpha": ALPHA}, cache=cache)
    site = site_packages(prefix)
    # Replaced (new inode) by a file of the same size whose mtime is older than the build.
    new = tmp_path / "core.py"
    new.write_bytes(ALPHA["alpha/core.py"].replace(b"return 1", b"return 2"))
    os.utime(new, ns=(0, 0))
    os.replace(new, site / "alpha/core.py")
    # Written in place through the link: the cache's copy changes with it.
    write_in_place(site / "alpha/__init__.py")
    assert (cache / "alpha/alpha/__init__.py").read_bytes() != ALPHA["alpha/__init__.py"]
    r = verify.check(prefix)
    files = {f["path"]: f for f in r["damaged"][0]["files"]}
    assert files["alpha/core.py"]["links"] == 1 and "in_place" not in files["alpha/core.py"]
    assert files["alpha/__init__.py"]["links"] == 2 and files["alpha/__init__.py"]["in_place"]
    assert "written in place through a hard link shared with 1 other link(s)" in verify.render(r)


def test_gone_distribution_missing_record_and_extra_distribution(tmp_path):
    prefix = make_env(tmp_path / "env", {"alpha": ALPHA, "beta": BETA, "gamma": GAMMA})
    site = site_packages(prefix)
    assert verify.check(prefix)["ok"]  # the index is written before the damage
    shutil.rmtree(site / "gamma-1.0.dist-info")
    (site / "beta-1.0.dist-info" / "RECORD").unlink()
    make_dist(site, "delta", "2.0", files={"delta.py": b""})
    r = verify.check(prefix)
    assert damaged(r)["gamma"] == [("gamma-1.0.dist-info", "the whole distribution is gone"),
                                   ("gamma-1.0.dist-info/METADATA", "missing")]
    assert damaged(r)["beta"] == [("beta-1.0.dist-info/RECORD", "missing")]
    assert r["extra"] == ["delta-2.0.dist-info"] and not r["ok"]


def test_the_index_follows_the_stamp(tmp_path):
    prefix = make_env(tmp_path / "env", {"alpha": ALPHA})
    verify.check(prefix)
    first = (prefix / verify.INDEX).stat().st_ino
    verify.check(prefix)
    assert (prefix / verify.INDEX).stat().st_ino == first  # reused while the stamp is the same
    make_dist(site_packages(prefix), "beta", "1.0", files=BETA)
    stamp(prefix)  # a new build (or repair) writes a new stamp: the index is made again
    assert verify.check(prefix)["files"] == 7 and (prefix / verify.INDEX).stat().st_ino != first
    (prefix / verify.INDEX).write_bytes(b"not marshal")
    assert verify.check(prefix)["ok"]


def test_no_stamp_is_not_an_env_to_check(tmp_path):
    prefix = make_env(tmp_path / "env", {"alpha": ALPHA})
    (prefix / STAMP).unlink()
    with pytest.raises(verify.KtenvError, match="has no readable ktenv-stamp.json"):
        verify.check(prefix)


def test_payload_written_in_place_corrupts_its_cache_entry_which_is_extracted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KTENV_CACHE_DIR", str(tmp_path / "ktenv-cache"))
    prefix = tmp_path / "env"
    site = make_site(prefix / "lib" / "python3.11")
    payload.materialize(site)
    stamp(prefix)
    assert verify.check(prefix)["ok"]
    manifest = payload.read_manifest(site)
    obj = payload.runtime_dir(site, manifest) / "sgl_kernel/sm100/common_ops.abi3.so"
    cached = payload.cache_root() / manifest.archive_sha256 / "sgl_kernel/sm100/common_ops.abi3.so"
    os.chmod(obj, 0o644)
    write_in_place(obj)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() != manifest.files["sgl_kernel/sm100/common_ops.abi3.so"]
    r = verify.check(prefix)
    [d] = r["damaged"]
    assert d["name"] == verify.PAYLOAD and d["in_place"] == 1
    broken = repair._break_links(site, {d["name"]: d})
    assert broken[0]["links"] == 2 and not obj.exists() and cached.exists()  # the link is broken, nothing written
    lines = []
    pc = repair._check_payload_cache(site, d, broken, lines.append)
    assert pc["corrupted"] and not cached.exists() and "payload cache entry is corrupted" in lines[0]
    assert not payload.materialize(site)["cache_hit"]  # extracted again from the parts, hash-checked
    assert obj.read_bytes() == FILES["sgl_kernel/sm100/common_ops.abi3.so"]
    assert verify.check(prefix, deep=True)["ok"]


def test_deep_goes_with_check_or_repair(cli):
    p = cli("env", "--arch", "sm90", "--deep")
    assert p.returncode == 2 and "--deep goes with --check or --repair" in p.stderr


# ---------------------------------------------------------------- slow: an env ktenv built, broken and repaired

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One env built by ktenv for this module; each test breaks it, repairs it and leaves it intact."""
    prefix = tmp_path_factory.mktemp("verify") / "env"
    p = env_cli(prefix, None, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    yield prefix
    shutil.rmtree(prefix.parent, ignore_errors=True)


def cli_env(prefix: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("env", "--arch", "sm90", "--prefix", str(prefix), *extra, env={**CACHE_ENV, **(env or {})}, timeout=1800)


def intact(prefix: Path, deep: bool = False) -> dict:
    p = cli_env(prefix, "--check", "--json", *(["--deep"] if deep else []))
    report = json.loads(p.stdout)
    assert p.returncode == 0 and report["ok"], p.stdout[-3000:]
    return report


def payload_object(site: Path) -> Path:
    return next(site.glob("sgl_kernel/_payload_cache/sgl-kernel-kt/*/*/sgl_kernel/sm100/common_ops.abi3.so"))


@pytest.mark.slow
def test_deleted_payload_object_and_libnvrtc_are_found_and_repaired(built):
    from ktenv import spec, target
    from ktenv.check import smoke, tier_import
    from ktenv.check.result import probe

    report = intact(built)
    assert report["files"] > 70_000 and report["payload_files"] >= 3
    site = site_packages(built)
    nvrtc = site / "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
    obj = payload_object(site)
    nvrtc.unlink()
    obj.unlink()

    p = cli_env(built, "--check")
    assert p.returncode == 1
    assert "nvidia-cuda-nvrtc-cu12 12.8.93: 1 file(s)\n    nvidia/cuda_nvrtc/lib/libnvrtc.so.12: missing" in p.stdout
    assert f"sgl-kernel payload {payload.read_manifest(site).version}: 1 file(s)" in p.stdout
    assert f"--prefix {built} --repair" in p.stdout

    # What smoke says about the same env now points at the repair.
    ctx = smoke.context(target.resolve(spec.load(REPO / "envs"), "sm90", lock_root=REPO / "lock", prefix=built))
    r = tier_import._payload(ctx, site)
    assert r.status == "failed" and f"--prefix {built} --repair" in r.remedy
    inv, _ = probe(ctx, "smoke_import.py", ["inventory"], {"requirements": ctx.requirements})
    v = tier_import._versions(ctx, inv)
    assert v.status == "failed" and "nvidia-cuda-nvrtc-cu12" in v.evidence and "--repair" in v.remedy
    # So does the audit: NVRTC's package is there, its library is not.
    from ktenv.check import audit
    rep = audit.audit(ctx.target)
    [fail] = [f for f in rep["failures"] if f["binary"] == "nvidia/cuda_nvrtc/lib"]
    assert "holds no libnvrtc.so.*" in fail["why"] and f"--prefix {built} --repair" in fail["why"]

    # `build.py env` with no flags no longer calls this env up to date: it repairs it.
    p = cli_env(built)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "up to date" not in p.stdout
    assert "are damaged; repairing them" in p.stderr and "repaired" in p.stdout
    assert "nvidia-cuda-nvrtc-cu12" in p.stdout and "sgl-kernel payload" in p.stdout
    assert nvrtc.is_file() and nvrtc.stat().st_nlink > 1  # linked from uv's cache again
    assert payload_object(site).stat().st_nlink > 1  # and from ktenv's payload cache
    st = json.loads((built / STAMP).read_text())
    assert st["repairs"][-1]["distributions"] == ["nvidia-cuda-nvrtc-cu12", "sgl-kernel payload"]
    intact(built)
    p = cli_env(built)
    assert p.returncode == 0 and "is up to date" in p.stdout


@pytest.mark.slow
def test_renamed_file_is_found_and_repaired(built):
    site = site_packages(built)
    einops = site / "einops/einops.py"
    einops.rename(site / "einops/einops_old.py")
    from ktenv import spec, target
    from ktenv.check import smoke, tier_import
    ctx = smoke.context(target.resolve(spec.load(REPO / "envs"), "sm90", lock_root=REPO / "lock", prefix=built))
    r = tier_import._import_one(ctx, "einops")  # smoke: the module no longer imports, and says what to run
    assert r.status == "failed" and f"--prefix {built} --check` names them" in r.remedy and "--repair` reinstalls them" in r.remedy
    p = cli_env(built, "--check", "--json")
    assert p.returncode == 1
    [d] = json.loads(p.stdout)["damaged"]
    assert (d["name"], d["files"]) == ("einops", [{"path": "einops/einops.py", "problem": "missing"}])
    p = cli_env(built, "--repair")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "repaired" in p.stdout and "einops" in p.stdout and "reinstalled einops==" in p.stderr
    assert einops.is_file()
    intact(built)


@pytest.mark.slow
def test_a_patched_distribution_gets_its_patches_back(built):
    """A damaged distribution that ktenv patched at build time is reinstalled fresh and patched again."""
    site = site_packages(built)
    ledger = sorted(site.glob("*.dist-info/ktenv-patches.json"))
    assert ledger, "the build patches some distributions' metadata"
    dist_info = ledger[0].parent
    before = (dist_info / "METADATA").read_bytes()
    rows = [r.split(",")[0] for r in (dist_info / "RECORD").read_text().splitlines()]
    victim = next(site / r for r in rows if r.endswith(".py") and not r.startswith(".."))
    victim.unlink()
    p = cli_env(built, "--repair", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["patches"] and all(c["distribution"] == verify.dist_name(dist_info.name)[0] for c in r["patches"])
    assert (dist_info / "METADATA").read_bytes() == before and victim.is_file()
    assert subprocess.run([uv_bin(), "pip", "check", "--python", str(built / "bin/python")], capture_output=True).returncode == 0
    intact(built)


@pytest.mark.slow
@pytest.mark.network
def test_a_file_written_in_place_corrupts_uvs_cache_which_is_refetched(built, tmp_path):
    """The in-place write goes through the hard link into uv's cache: shown on a private cache, then repaired."""
    uv_cache = tmp_path / "uv-cache"  # never the shared cache: this test corrupts it on purpose
    env = {"UV_CACHE_DIR": str(uv_cache)}
    req = tmp_path / "idna.txt"
    text = (REPO / "lock/sm90/requirements.txt").read_text()
    start = text.index("\nidna==") + 1
    req.write_text(text[start:text.index("# via", start)])
    py = str(built / "bin/python")
    subprocess.run([uv_bin(), "pip", "install", "-q", "--python", py, "--no-deps", "--require-hashes", "--reinstall", "-r", str(req)],
                   check=True, env={**os.environ, **env})
    site = site_packages(built)
    core = site / "idna/core.py"
    [archive] = [p.parent for p in (uv_cache / "archive-v0").glob("*/idna-*.dist-info")]
    cached = archive / "idna/core.py"
    assert core.stat().st_ino == cached.stat().st_ino  # the env's file IS uv's cache copy
    want = next(line.split(",")[1] for line in (archive / next(archive.glob("idna-*.dist-info")).name / "RECORD").read_text().splitlines()
                if line.startswith("idna/core.py,"))
    assert verify._digest(cached, "sha256") == want
    write_in_place(core)
    assert verify._digest(cached, "sha256") != want  # the cache is corrupted for every later env

    p = cli_env(built, "--check", env=env)
    assert p.returncode == 1 and "idna/core.py: content differs (sha256); written in place through a hard link" in p.stdout
    p = cli_env(built, "--repair", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "uv cache entry for idna was corrupted" in p.stdout and "the same inode as the env's damaged file" in p.stdout
    assert "removing it with `uv cache clean idna`" in p.stderr
    assert not archive.exists()  # the corrupted entry is gone; the wheel was fetched again
    [fresh] = [p.parent for p in (uv_cache / "archive-v0").glob("*/idna-*.dist-info")]
    assert verify._digest(fresh / "idna/core.py", "sha256") == want
    assert core.stat().st_ino == (fresh / "idna/core.py").stat().st_ino and verify._digest(core, "sha256") == want
    intact(built)


@pytest.mark.slow
def test_repair_refuses_what_a_reinstall_cannot_fix(built):
    site = site_packages(built)
    stamp_path = built / STAMP
    original = stamp_path.read_bytes()
    (site / "einops/einops.py").unlink()
    try:
        st = json.loads(original)
        stamp_path.write_text(json.dumps({**st, "requirements_sha256": "sha256:" + "0" * 64}))
        p = cli_env(built, "--repair")
        assert p.returncode == 2 and "was built from another lock" in p.stderr and "Rebuild it instead" in p.stderr
        stamp_path.write_text(json.dumps({**st, "kt_kernel": {**st["kt_kernel"], "source_build": {"path": "x"}}}))
        kt = next(site.glob("kt_kernel/*.py"))
        kt.unlink()
        p = cli_env(built, "--repair")
        assert p.returncode == 2 and "built from source (--kt-source)" in p.stderr
    finally:
        stamp_path.write_bytes(original)
    p = cli_env(built, "--repair")
    assert p.returncode == 0, p.stderr[-3000:]
    intact(built)


@pytest.mark.slow
def test_deep_check_of_a_built_env(built):
    """--deep hashes every file (12 GB); a replaced file with the size and an old mtime is found by both passes."""
    site = site_packages(built)
    target = site / "einops/__init__.py"
    fresh = target.with_name(".tmp")
    fresh.write_bytes(target.read_bytes())  # its own inode: the write below cannot reach uv's cache
    write_in_place(fresh)
    os.utime(fresh, ns=(0, 0))
    os.replace(fresh, target)
    p = cli_env(built, "--check", "--json")
    r = json.loads(p.stdout)  # the stat pass: one link left where einops is hard-linked from uv's cache
    assert p.returncode == 1 and [d["name"] for d in r["damaged"]] == ["einops"] and r["hashed"] < 100
    p = cli_env(built, "--check", "--deep", "--json")
    r = json.loads(p.stdout)
    assert p.returncode == 1 and r["hashed"] == r["files"] and r["hashed_bytes"] > 10e9
    assert [d["name"] for d in r["damaged"]] == ["einops"]
    assert cli_env(built, "--repair").returncode == 0
    intact(built, deep=True)


@pytest.mark.slow
def test_a_distribution_without_its_record_is_reinstalled(built):
    """uv cannot uninstall a distribution whose RECORD is gone; the repair clears its dist-info first."""
    site = site_packages(built)
    [record] = site.glob("einops-*.dist-info/RECORD")
    record.unlink()
    p = cli_env(built, "--check")
    assert p.returncode == 1 and f"{record.parent.name}/RECORD: missing" in p.stdout
    p = cli_env(built)
    assert p.returncode == 0 and "repaired" in p.stdout and record.is_file(), p.stderr[-3000:]
    intact(built)
