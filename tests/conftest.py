"""Fixtures for every test under tests/: ports reserved by a test are given back after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import release_ports


@pytest.fixture(autouse=True)
def _release_reserved_ports() -> Iterator[None]:
    yield
    release_ports()
