"""The test suite's own habits: no test file imports from another test file or from a conftest.py (shared
fixtures live in conftest.py, shared plain helpers in named modules such as tests/serve/fake_app.py), and
the `slow` marker is registered so `pytest -m "not slow"` selects the fast subset."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent

# also inside the scripts a test runs in a subprocess, which are strings to the AST
IMPORT_OF_A_TEST_MODULE = re.compile(r"^\s*(?:from|import)\s+(tests(?:\.\w+)*\.(?:test_\w+|conftest))\b", re.M)


def test_no_test_file_imports_another_test_file_or_a_conftest():
    offenders = [f"{path.relative_to(ROOT)}: {match.group(1)}"
                 for path in sorted(TESTS.rglob("*.py"))
                 for match in IMPORT_OF_A_TEST_MODULE.finditer(path.read_text())]
    assert offenders == [], "move what is shared into conftest.py (fixtures) or a helper module: " + "; ".join(offenders)


def test_the_slow_marker_is_registered_and_markers_are_strict():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(marker.startswith("slow:") for marker in options["markers"])
    assert "--strict-markers" in options["addopts"]
