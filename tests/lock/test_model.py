"""The lock model: the one requirements parser, departures, the hash check."""

from __future__ import annotations

import pytest

from ktenv.errors import KtenvError
from ktenv.lock.model import REMOVED, Departure, parse_requirements

from conftest import FIXTURES


def test_parse_requirements_reads_hashes_markers_and_via():
    entries = parse_requirements((FIXTURES / "lock" / "requirements-markers.txt").read_text())
    assert [(e.name, e.version, e.marker) for e in entries] == [
        ("accelerate-kt", "1.14.0.post4", ""),
        ("kt-kernel", "0.7.2", 'python_version == "3.12"'),
        ("kt-kernel", "0.7.2", 'python_version == "3.11"'),
        ("transformers-kt", "5.6.0.post6", ""),
    ]
    assert len(entries[2].hashes) == 2 and entries[0].via == ["sglang-kt"]


def test_parse_requirements_refuses_an_unpinned_line():
    with pytest.raises(KtenvError, match="is not a pinned requirement"):
        parse_requirements("torch>=2.9\n")


def test_departure_knows_its_owner_and_whether_it_removes():
    d = Departure("transformers", "compressed-tensors==0.12.2", "transformers", REMOVED, "transformers-kt-owns-transformers")
    assert d.removes and d.owner == ("compressed-tensors", "0.12.2")
    d = Departure("flashinfer-python", "sglang-kt==0.7.2", "flashinfer_python==0.6.3", "0.6.11.post3", "flashinfer-lockstep")
    assert not d.removes and d.owner == ("sglang-kt", "0.7.2")
