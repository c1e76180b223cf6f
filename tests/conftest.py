"""Hooks for every test under tests/.

Ports reserved by a test are given back after it; the running test is known
to :func:`tests.support.require_redis` and friends, which fail a test that
uses a service without the ``services`` mark (``-m "not services"`` must run
with no service at all).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import release_ports, running_test


@pytest.fixture(autouse=True)
def _release_reserved_ports() -> Iterator[None]:
    yield
    release_ports()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with running_test(item):
        return (yield)
