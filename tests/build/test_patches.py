"""ktenv.patches: metadata edits derived from the lock, patches/*.toml, file ownership.

Fast tests work on small but real dist-info trees written here (METADATA,
RECORD); the slow test patches a real env synced from lock/sm90 and shows
`uv pip check` failing before and clean after.
"""

from __future__ import annotations

import base64
import dataclasses
import csv
import hashlib
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from ktenv.build import dists as distinfo
from ktenv.build import patches
from ktenv.build.patches import PatchError
from ktenv.lock import model as lockfile
from ktenv.lock.model import Departure
from ktenv.tools import uv_bin

from conftest import sync_raw_env

REPO = Path(__file__).resolve().parents[2]


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_dist(site: Path, name: str, version: str, requires: list[str] = (), files: dict[str, bytes] | None = None) -> Path:
    """A real installed distribution: dist-info with METADATA and a truthful RECORD."""
    di = site / f"{name.replace('-', '_')}-{version}.dist-info"
    di.mkdir(parents=True)
    meta = "Metadata-Version: 2.4\nName: {}\nVersion: {}\n{}\nLong description: Requires-Dist: not-a-header\n".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    (di / "METADATA").write_text(meta)
    rows = []
    for rel, data in (files or {}).items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        rows.append([rel, _digest(data), str(len(data))])
    rows.append([f"{di.name}/METADATA", _digest(meta.encode()), str(len(meta))])
    rows.append([f"{di.name}/RECORD", "", ""])
    with open(di / "RECORD", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return di


def record_ok(site: Path, di: Path) -> None:
    """Every hashed RECORD row matches the file on disk."""
    for row in csv.reader(open(di / "RECORD")):
        if row[1]:
            data = (site / row[0]).read_bytes()
            assert row[1] == _digest(data) and int(row[2]) == len(data), row[0]


def requires_of(di: Path) -> list[str]:
    return [l.split(":", 1)[1].strip() for l in (di / "METADATA").read_text().split("\n\n")[0].splitlines() if l.startswith("Requires-Dist:")]


DEPARTURES = [
    Departure("flashinfer-python", "sglang-kt==0.7.2", "flashinfer_python==0.6.3", "0.6.11.post3", "flashinfer-lockstep"),
    Departure("transformers", "compressed-tensors==0.12.2", "transformers", "(removed)", "transformers-kt-owns-transformers"),
    Departure("nvidia-cutlass-dsl", "nvidia-cudnn-frontend==1.32.0", "nvidia-cutlass-dsl[cu13]>=4.8.0", "4.5.3", "cutlass-dsl-cascade"),
]


@pytest.fixture
def site(tmp_path) -> Path:
    s = tmp_path / "site-packages"
    make_dist(s, "sglang-kt", "0.7.2", ["flashinfer_python==0.6.3", "torch==2.9.1", "pytest; extra == \"test\""])
    make_dist(s, "compressed-tensors", "0.12.2", ["torch>=1.7", "transformers", "transformers[dev]; extra == \"dev\""])
    make_dist(s, "nvidia-cudnn-frontend", "1.32.0", ['nvidia-cutlass-dsl[cu13]>=4.8.0; sys_platform != "win32" or platform_machine != "ARM64"'])
    return s


def test_departures_rewrite_metadata_to_what_is_locked(site):
    report = patches.apply(site, DEPARTURES, [], "0.7.2")
    dists = distinfo.installed(site)
    assert requires_of(dists["sglang-kt"].dist_info) == ["flashinfer_python==0.6.11.post3", "torch==2.9.1", 'pytest; extra == "test"']
    # removed where the rule removed the package; the optional extra's line is not in play and stays
    assert requires_of(dists["compressed-tensors"].dist_info) == ["torch>=1.7", 'transformers[dev]; extra == "dev"']
    # the override replaced the whole requirement, extras included; the marker is kept
    assert requires_of(dists["nvidia-cudnn-frontend"].dist_info) == ['nvidia-cutlass-dsl==4.5.3; sys_platform != "win32" or platform_machine != "ARM64"']
    assert len(report["changes"]) == 3
    assert {c["by"] for c in report["changes"]} == {"rule flashinfer-lockstep", "rule transformers-kt-owns-transformers", "rule cutlass-dsl-cascade"}
    for d in dists.values():
        record_ok(site, d.dist_info)
        assert (d.dist_info / patches.LEDGER).is_file()
    # the body of METADATA (after the headers) is not touched
    assert "Long description: Requires-Dist: not-a-header" in (dists["sglang-kt"].dist_info / "METADATA").read_text()


def test_patching_never_writes_through_a_hard_link(site, tmp_path):
    meta = distinfo.installed(site)["sglang-kt"].dist_info / "METADATA"
    cache_copy = tmp_path / "uv-cache-METADATA"
    os.link(meta, cache_copy)  # what uv's hard-link install mode leaves behind
    before = cache_copy.read_bytes()
    patches.apply(site, DEPARTURES[:1], [], "0.7.2")
    assert cache_copy.read_bytes() == before
    assert meta.stat().st_ino != cache_copy.stat().st_ino


def test_patching_is_deterministic(tmp_path):
    outs = []
    for n in range(2):
        s = tmp_path / f"s{n}"
        make_dist(s, "sglang-kt", "0.7.2", ["flashinfer_python==0.6.3"])
        patches.apply(s, DEPARTURES[:1], [], "0.7.2")
        di = distinfo.installed(s)["sglang-kt"].dist_info
        outs.append([(di / f).read_bytes() for f in ("METADATA", "RECORD", patches.LEDGER)])
    assert outs[0] == outs[1]


def test_a_departure_the_wheel_does_not_have_is_an_error(site):
    bad = dataclasses.replace(DEPARTURES[0], package="flashinfer-cubin", declared="flashinfer_cubin==0.6.3")
    with pytest.raises(PatchError, match="has no requirement on flashinfer-cubin.*re-run `python build.py lock`"):
        patches.apply(site, [bad], [], "0.7.2")


def test_a_departure_for_another_version_is_an_error(site):
    bad = dataclasses.replace(DEPARTURES[0], declared_by="sglang-kt==0.7.0")
    with pytest.raises(PatchError, match="departure in sglang-kt==0.7.0, but the env has sglang-kt 0.7.2"):
        patches.apply(site, [bad], [], "0.7.2")


def test_departure_of_an_uninstalled_distribution_is_skipped(site):
    other = dataclasses.replace(DEPARTURES[0], declared_by="xgrammar==0.1.27")
    assert patches.apply(site, [other], [], "0.7.2")["changes"] == []


# ---------------------------------------------------------------- patches/*.toml

def write_patches(d: Path, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "p.toml").write_text(textwrap.dedent(text))
    return d


def test_shipped_patches_load_and_say_why():
    ps = patches.load_patches(REPO / "patches")
    assert {p.id for p in ps} >= {"build-backend-py", "payload-prefer-packaged"}
    for p in ps:
        assert p.reason and p.evidence


@pytest.mark.parametrize("body, message", [
    ('id = "a"\nkind = "source"\nstack = ">=0.7"\nevidence = ["x"]\n', "needs both a reason and evidence"),
    ('id = "a"\nkind = "rewrite"\nstack = ">=0.7"\nreason = "r"\nevidence = ["x"]\n', "kind must be one of"),
    ('id = "a"\nkind = "requires"\nreason = "r"\nevidence = ["x"]\ndistribution = "x"\nremove = ["y"]\n', "needs `stack`"),
    ('id = "a"\nkind = "source"\nstack = ">=0.7"\nreason = "r"\nevidence = ["x"]\ndistribution = "x"\nfile = "f.py"\nsha256 = "abc"\n', "upstream `sha256`"),
    ('id = "a"\nkind = "shared-file"\nstack = ">=0.7"\nreason = "r"\nevidence = ["x"]\npath = "f.py"\ndistributions = ["one"]\n', "at least two `distributions`"),
    ('id = "a"\nkind = "requires"\nstack = "0.7"\nreason = "r"\nevidence = ["x"]\ndistribution = "x"\nremove = ["y"]\n', "not a PEP 440 specifier"),
    ('id = "a"\nkind = "requires"\nstack = ">=0.7"\nreason = "r"\nevidence = ["x"]\ndistribution = "x"\nremove = ["y"]\ntypo = 1\n', "unknown key"),
])
def test_malformed_patches_are_refused(tmp_path, body, message):
    d = write_patches(tmp_path / "patches", "[[patch]]\n" + body)
    with pytest.raises(PatchError, match=message):
        patches.load_patches(d)


SOURCE = b"def f():\n    return 1\n"


def source_patch(tmp_path: Path, sha: str, old: str = "return 1", version: str = "==1.0", stack: str = ">=0.7") -> list:
    d = write_patches(tmp_path / "patches", f'''
        [[patch]]
        id = "f-returns-2"
        kind = "source"
        distribution = "demo"
        version = "{version}"
        stack = "{stack}"
        file = "demo/mod.py"
        sha256 = "{sha}"
        reason = "r"
        evidence = ["e"]
        [[patch.edit]]
        old = "{old}"
        new = "return 2"
    ''')
    return patches.load_patches(d)


def test_source_patch_applies_and_updates_record(tmp_path):
    site = tmp_path / "site"
    di = make_dist(site, "demo", "1.0", files={"demo/mod.py": SOURCE})
    report = patches.apply(site, [], source_patch(tmp_path, hashlib.sha256(SOURCE).hexdigest()), "0.7.2")
    assert (site / "demo/mod.py").read_bytes() == b"def f():\n    return 2\n"
    assert report["changes"][0]["by"] == "patch f-returns-2"
    record_ok(site, di)


def test_source_patch_refuses_a_changed_upstream_file(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "demo", "1.0", files={"demo/mod.py": SOURCE})
    with pytest.raises(PatchError, match="Upstream changed the file: review the patch"):
        patches.apply(site, [], source_patch(tmp_path, "0" * 64), "0.7.2")
    assert (site / "demo/mod.py").read_bytes() == SOURCE


def test_source_patch_edit_must_match_once(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "demo", "1.0", files={"demo/mod.py": SOURCE})
    with pytest.raises(PatchError, match="occurs 0 times"):
        patches.apply(site, [], source_patch(tmp_path, hashlib.sha256(SOURCE).hexdigest(), old="return 3"), "0.7.2")


def test_patches_outside_their_versions_are_skipped(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "demo", "1.0", files={"demo/mod.py": SOURCE})
    sha = hashlib.sha256(SOURCE).hexdigest()
    r = patches.apply(site, [], source_patch(tmp_path, sha, version=">=2"), "0.7.2")
    assert r["changes"] == [] and "outside >=2" in r["skipped"][0]["why"]
    r = patches.apply(site, [], source_patch(tmp_path, sha, stack="<0.7"), "0.7.2")
    assert r["changes"] == [] and r["skipped"] == []
    assert (site / "demo/mod.py").read_bytes() == SOURCE


def test_patches_hash_follows_the_inputs(tmp_path):
    sha = hashlib.sha256(SOURCE).hexdigest()
    ps = source_patch(tmp_path, sha)
    deps = DEPARTURES
    h = patches.patches_hash(deps, ps, "0.7.2")
    assert h == patches.patches_hash(list(reversed(DEPARTURES)), ps, "0.7.2")
    assert h != patches.patches_hash(deps[:1], ps, "0.7.2")
    assert h != patches.patches_hash(deps, [], "0.7.2")
    assert patches.patches_hash(deps, ps, "0.6.4") == patches.patches_hash(deps, source_patch(tmp_path, sha, stack=">=0.7"), "0.6.4") != h


# ---------------------------------------------------------------- file ownership

def test_two_distributions_installing_one_file_is_refused(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "transformers", "5.15.1", files={"transformers/__init__.py": b"upstream"})
    make_dist(site, "transformers-kt", "5.6.0.post6", files={"transformers/__init__.py": b"fork"})
    with pytest.raises(PatchError, match=r"transformers/__init__.py \(transformers and transformers-kt\).*depends on install order"):
        patches.apply(site, [], [], "0.7.2")


def test_identical_shared_files_are_not_reported(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "nvidia-cublas-cu12", "12.8.4.1", files={"nvidia/__init__.py": b""})
    make_dist(site, "nvidia-cuda-runtime-cu12", "12.8.90", files={"nvidia/__init__.py": b""})
    assert patches.shared_files(site) == []


def test_a_shared_file_entry_accepts_a_known_overlap(tmp_path):
    site = tmp_path / "site"
    make_dist(site, "flashinfer-python", "0.6.11.post3", files={"build_backend.py": b"a"})
    make_dist(site, "torch-c-dlpack-ext", "0.1.5", files={"build_backend.py": b"b"})
    r = patches.apply(site, [], patches.load_patches(REPO / "patches"), "0.7.2")
    assert r["shared_files"] == [{"path": "build_backend.py", "distributions": ["flashinfer-python", "torch-c-dlpack-ext"]}]


# ---------------------------------------------------------------- a real env

@pytest.fixture(scope="module")
def synced_env(tmp_path_factory):
    # Its own env: the test patches it, and test_payload needs an unpatched one.
    env = sync_raw_env(tmp_path_factory.mktemp("patched") / "env")
    yield env, lockfile.read(REPO / "lock" / "sm90")
    shutil.rmtree(env.parent, ignore_errors=True)  # ~10 GB of (mostly hard-linked) files


@pytest.mark.slow
@pytest.mark.network
def test_uv_pip_check_is_clean_only_after_patching(synced_env):
    env, lock = synced_env
    check = [uv_bin(), "pip", "check", "--python", str(env / "bin/python")]
    before = subprocess.run(check, capture_output=True, text=True)
    assert before.returncode != 0
    assert "`sglang-kt` requires `flashinfer-python==0.6.3`, but `0.6.11.post3` is installed" in before.stdout + before.stderr
    assert "`quack-kernels` requires `nvidia-cutlass-dsl>=4.3.4,<4.4.0`" in before.stdout + before.stderr

    site = distinfo.site_packages(env)
    report = patches.apply(site, lock.departures, patches.load_patches(REPO / "patches"), lock.stack)
    after = subprocess.run(check, capture_output=True, text=True)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "All installed packages are compatible" in after.stdout + after.stderr
    # the source patch went in and kt-kernel's RECORD vouches for the new file
    assert any(c["by"] == "patch payload-prefer-packaged" for c in report["changes"])
    record_ok(site, distinfo.installed(site)["kt-kernel"].dist_info)
    assert [s["path"] for s in report["shared_files"]] == ["build_backend.py"]
