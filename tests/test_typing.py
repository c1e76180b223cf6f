"""The package type-checks under ``mypy --strict`` (settings in pyproject.toml),
and mypy, not a run-time check, is what holds a backend to its kind's Protocol."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(*args, cache):
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mypy_strict_is_clean(mypy_cache):
    result = mypy("iii", cache=mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_backend_that_breaks_its_protocol_fails_the_type_check(mypy_cache, tmp_path):
    # A cron lock backend whose try_lock takes an int, registered the way
    # every BACKENDS table is: mypy must refuse the entry.
    source = tmp_path / "broken_backend.py"
    source.write_text(
        textwrap.dedent("""
        from collections.abc import AsyncIterator
        from contextlib import asynccontextmanager
        from typing import Any

        from iii.adapters import Backend, backend
        from iii.adapters.cron.base import CronLockAdapter
        from iii.adapters.cron.embedded import Config


        class Broken:
            lock_ttl: float = 1.0

            async def try_lock(self, key: int) -> bool:
                return True


        @asynccontextmanager
        async def open_adapter(config: Config, hooks: None) -> AsyncIterator[Broken]:
            yield Broken()


        @asynccontextmanager
        async def open_fine(config: Config, hooks: None) -> AsyncIterator[Any]:
            yield Broken()


        class OtherConfig:
            pass


        BACKENDS: dict[str, Backend[Any, None, CronLockAdapter]] = {
            "broken": backend(Config, open_adapter),
            "mismatched": backend(OtherConfig, open_fine),
        }
    """)
    )
    result = mypy(str(source), cache=mypy_cache)
    assert result.returncode == 1, result.stdout
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, result.stdout
    assert "Broken" in errors[0] and "CronLockAdapter" in errors[0]  # the Protocol
    assert "OtherConfig" in errors[1]  # the factory takes another config class
