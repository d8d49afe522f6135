"""Fixtures of the attack suites (test_hostile_server.py, test_hostile_http.py): each module starts its
own ``server``; these watch that server's /livez and measure its process tree's memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.process_watch import LivezWatch, Memory


@pytest.fixture(scope="module")
def watch(server) -> Iterator[LivezWatch]:
    with LivezWatch(server.url) as livez:
        yield livez


@pytest.fixture(scope="module")
def memory(server) -> Memory:
    return Memory(server.proc.pid)
