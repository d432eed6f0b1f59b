"""The identity package keeps the core's sans-I/O rule: no clock, no randomness, no files."""

from __future__ import annotations

import ast
from pathlib import Path

import aegis_edge_core.identity

PACKAGE = Path(aegis_edge_core.identity.__file__).parent

FORBIDDEN_CALLS = {
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "sleep"),
    ("os", "urandom"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("secrets", "token_bytes"),
    ("Ed25519PrivateKey", "generate"),
}
FORBIDDEN_MODULES = {"os", "time", "secrets", "socket", "subprocess", "asyncio", "threading"}


def test_no_clock_randomness_or_files() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in FORBIDDEN_MODULES, (path, alias.name)
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in FORBIDDEN_MODULES, (path, node.module)
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name):
                    assert func.id != "open", path
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    assert (func.value.id, func.attr) not in FORBIDDEN_CALLS, (path, func.attr)
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute):
                    assert (func.value.attr, func.attr) not in FORBIDDEN_CALLS, (path, func.attr)


def test_public_api_is_exported() -> None:
    for name in aegis_edge_core.identity.__all__:
        assert hasattr(aegis_edge_core.identity, name), name
