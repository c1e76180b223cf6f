"""ruff over the whole project, as CI runs it (ruff pinned in the ``test`` extra).

* ``ruff check`` with the project's rules (pyproject ``[tool.ruff.lint]``):
  pyflakes, pycodestyle, import order, bugbear and the async/trio rules, over
  the engine, the tests, the fuzz targets and the benchmarks.  A test that
  cannot run is a test that cannot fail: a second ``def test_x`` shadows the
  first (F811), a closure over a loop variable sees only its last value
  (B023), an unused name is often an assertion never written (F841).
* ``ruff format --check``: the code is formatted (line length 100, set once).
"""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

PATHS = ["iii", "tests", "fuzz", "bench"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_check_passes() -> None:
    result = ruff("check", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted() -> None:
    result = ruff("format", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
