#!/usr/bin/env python3
"""Fail CI when a test skipped for a reason not on .ci/allowed-skips.txt.

A test may skip only for something genuinely absent (a GPU, a fetched
checkout, a CPU feature); never for something ktenv pins or the README's
set-up installs. Reads pytest's JUnit XML report.
"""

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def allowed() -> list[re.Pattern]:
    lines = (Path(__file__).parent / "allowed-skips.txt").read_text().splitlines()
    return [re.compile(line) for line in lines if line.strip() and not line.startswith("#")]


def main(report: str) -> int:
    patterns = allowed()
    bad = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for skip in case.findall("skipped"):
            message = skip.get("message", "")
            if not any(p.search(message) for p in patterns):
                bad.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    if bad:
        print(f"{len(bad)} test(s) skipped for a reason that is not on .ci/allowed-skips.txt:", file=sys.stderr)
        print("\n".join(f"  {b}" for b in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
