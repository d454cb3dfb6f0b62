"""The departure check and the lockstep pick, offline, against a recorded index.

tests/fixtures/index/sm90-0.7.2.json was recorded from PyPI with
`ktenv.lock.index.record` for the committed lock/sm90 (every pinned wheel's
Requires-Dist, and the flashinfer releases with their upload times), so the
check that found the cudnn-frontend cascade runs here without the network.
"""

from __future__ import annotations

import dataclasses

import pytest

from ktenv import spec as specmod
from ktenv.errors import ResolveError
from ktenv.lock import departures, model, resolve
from ktenv.lock.index import RecordedIndex

from conftest import FIXTURES, REPO

SPEC = specmod.load(REPO / "envs")
INDEX = RecordedIndex(FIXTURES / "index" / "sm90-0.7.2.json")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KTENV_CACHE_DIR", str(tmp_path / "cache"))  # lockstep picks are cached there


def test_the_committed_lock_departs_exactly_where_its_rules_say():
    lock = model.read(REPO / "lock" / "sm90")
    inputs = specmod.inputs(SPEC, "sm90")
    got = departures.compute(SPEC, inputs, lock.entries(), INDEX)
    assert got == lock.departures
    assert {d.rule for d in got} == {"flashinfer-lockstep", "cutlass-dsl-cascade"}


def test_a_departure_no_rule_covers_refuses_the_lock():
    """Without the cutlass-dsl-cascade rule, quack-kernels' cap on nvidia-cutlass-dsl is broken by no decision."""
    lock = model.read(REPO / "lock" / "sm90")
    inputs = specmod.inputs(SPEC, "sm90", disabled=("cutlass-dsl-cascade",))
    with pytest.raises(ResolveError) as e:
        departures.compute(SPEC, inputs, lock.entries(), INDEX)
    msg = str(e.value)
    assert "departs from upstream where no rule says it may" in msg
    assert "quack-kernels==0.2.4 declares nvidia-cutlass-dsl<4.4.0,>=4.3.4, the lock has nvidia-cutlass-dsl 4.5.3" in msg


def test_a_package_a_rule_did_not_remove_is_a_stray_departure():
    lock = model.read(REPO / "lock" / "sm90")
    entries = [e for e in lock.entries() if e.name != "filelock"]  # as if a resolver had dropped it silently
    with pytest.raises(ResolveError, match=r"declares filelock.*the lock has filelock \(removed\)"):
        departures.compute(SPEC, specmod.inputs(SPEC, "sm90"), entries, INDEX)


def test_lockstep_picks_the_newest_common_release_before_the_cutoff():
    inputs = specmod.inputs(SPEC, "sm90")
    group = inputs.lockstep[0]
    assert resolve.pick_lockstep(group, inputs, INDEX, {}, refresh=True) == "0.6.11.post3"
    # An earlier cut-off moves the pick back to what was published then.
    early = dataclasses.replace(inputs, exclude_newer="2026-05-10T00:00:00Z")
    assert resolve.pick_lockstep(group, early, INDEX, {}, refresh=True) != "0.6.11.post3"


def test_lockstep_without_a_common_release_says_what_exists():
    inputs = specmod.inputs(SPEC, "sm90")
    group = dict(inputs.lockstep[0], spec=">=0.6.14,<0.7")  # cubin stops at 0.6.13
    with pytest.raises(ResolveError, match=r"needs flashinfer-python, flashinfer-cubin at one common version <0.7,>=0.6.14, published before .*flashinfer-cubin: none\)"):
        resolve.pick_lockstep(group, inputs, INDEX, {}, refresh=True)
