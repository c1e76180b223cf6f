"""ruff's correctness rules over the tests themselves (ruff pinned in the ``test`` extra).

A test that cannot run is a test that cannot fail: a second ``def test_x``
shadows the first, which then never runs (F811); a closure over a loop
variable sees only its last value (B023); an unused name often means an
assertion that was never written (F841).  Style (line length, formatting) is
not checked here.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

RULES = "F,B,E9"


def test_the_tests_pass_ruffs_correctness_rules() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--select",
            RULES,
            "--output-format",
            "concise",
            "tests",
            "fuzz",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
