"""Reading envs/*.toml strictly: every error names the file, the table and what to do.

The same files are read by flake.nix with builtins.fromTOML, so only plain
TOML data is accepted and unknown keys are refused (a typo in a key would
otherwise be silently ignored by one reader and not the other).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from ..errors import SpecError


def read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found. ktenv expects the stack description in envs/.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already ends with "(at line N, column M)".
        raise SpecError(f"{path}: malformed TOML: {e}. Fix the file and rerun.") from None


def check_keys(path: Path, table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(
            f"{path}: unknown key(s) {', '.join(unknown)} in {where}. "
            f"Allowed: {', '.join(sorted(allowed))}. (Unknown keys are refused so that "
            "a typo cannot be read differently by Python and Nix.)"
        )


def need(path: Path, table: dict, key: str, kind: type, where: str):
    if key not in table:
        raise SpecError(f"{path}: {where} is missing the required key {key!r}.")
    value = table[key]
    if not isinstance(value, kind):
        raise SpecError(f"{path}: {where}.{key} must be a {kind.__name__}, got {value!r}.")
    return value


def specifier(path: Path, text: str, where: str) -> SpecifierSet:
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise SpecError(f"{path}: {where}: {text!r} is not a PEP 440 version specifier (e.g. \">=0.6.9,<0.7\").") from None
