"""Freed memory goes back to the system after a burst, not on every allocation (app/engine/malloc.py)."""

from __future__ import annotations

import asyncio

import pytest

from app.engine import malloc

pytestmark = pytest.mark.skipif(not malloc.supported(), reason="glibc only")


def test_large_blocks_are_mapped_and_small_planes_stay_on_the_heap():
    assert malloc.return_freed_memory()
    assert 1024 * 1024 < malloc.MMAP_THRESHOLD_BYTES <= 4 * 1024 * 1024 < 2048 * 2048 * 4
    assert malloc.trim() in (True, False)


def test_idle_trim_runs_once_after_a_burst_and_never_during_it(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "trim", lambda: calls.append(1) or True)
    idle = malloc.IdleTrim(idle_s=0.05, min_interval_s=0.0)

    async def burst() -> None:
        async def request() -> None:
            with idle.busy():
                await asyncio.sleep(0.01)

        for _ in range(5):  # back to back, each alone: idle for far less than idle_s between them
            await request()
        assert calls == []
        await asyncio.gather(*(request() for _ in range(4)))
        await asyncio.sleep(0.15)

    asyncio.run(burst())
    assert calls == [1] and idle.trims == 1


def test_idle_trim_is_rate_limited(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "trim", lambda: calls.append(1) or True)
    idle = malloc.IdleTrim(idle_s=0.01, min_interval_s=10.0)

    async def bursts() -> None:
        for _ in range(3):
            with idle.busy():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)

    asyncio.run(bursts())
    assert calls == [1]
