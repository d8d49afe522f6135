"""Admission control: above capacity a request is refused at once with 503 + Retry-After, instead of
queueing for seconds (128 clients on one GPU gave a p95 of 3.9 s before this existed).

A request *waits* from admission until its batch is taken by the model, decoding included (a
backlog in front of the host workers is as much a queue as the batcher's). A new request is
refused when ``max_waiting`` requests already wait, when the waiting requests need longer than
``max_wait_s`` at the measured model speed (so a burst cannot queue for seconds), or when the
oldest one has waited longer than ``max_wait_s`` (the queue is not draining, whatever the reason:
a slow model or busy host workers). Retry-After is the time the waiting requests need at the
measured model speed, at least 1 s.

The speed is the time between batches while requests wait (what the whole pipeline delivers, host
work and contention included), or the model call's own time after an idle spell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from app.core.errors import Overloaded

RETRY_AFTER_MAX_S = 60
_EWMA = 0.2  # weight of the newest batch in the per-image model time


class Admission:
    def __init__(self, max_waiting: int, max_wait_s: float, on_depth: Callable[[int], None] | None = None) -> None:
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self._on_depth = on_depth or (lambda n: None)
        self._waiting: dict[int, float] = {}  # ticket -> admitted at; insertion order = arrival order
        self._next_ticket = 0
        self._per_image_s = 0.0
        self._last_batch_end: float | None = None
        self._backlog_at_last_end = 0

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def oldest_wait_s(self, now: float | None = None) -> float:
        first = next(iter(self._waiting.values()), None)
        return 0.0 if first is None else (now or time.perf_counter()) - first

    def expected_wait_s(self) -> float:
        """How long a request admitted now would wait for the model, at the measured speed."""
        return (len(self._waiting) + 1) * self._per_image_s

    def retry_after_s(self) -> int:
        return min(RETRY_AFTER_MAX_S, max(1, math.ceil(self.expected_wait_s())))

    def check(self) -> None:
        """``Overloaded`` (503 with Retry-After) when a new request would not be admitted."""
        if len(self._waiting) >= self.max_waiting:
            reason = f"the inference queue is full ({len(self._waiting)} waiting)"
        # An empty queue always admits: the estimate only refreshes when batches run, so a slow spell
        # (a loaded machine, huge images) must not refuse every later request on its own estimate.
        elif self._waiting and (expected := self.expected_wait_s()) > self.max_wait_s:
            reason = (f"the inference queue is full: {len(self._waiting)} waiting need about {expected * 1000:.0f} ms "
                      f"(limit {self.max_wait_s * 1000:.0f} ms)")
        elif (waited := self.oldest_wait_s()) > self.max_wait_s:
            reason = (f"the inference queue is not draining: the oldest request has waited {waited * 1000:.0f} ms "
                      f"(limit {self.max_wait_s * 1000:.0f} ms)")
        else:
            return
        raise Overloaded(f"{reason}; retry shortly", headers={"Retry-After": str(self.retry_after_s())})

    def admit(self) -> int:
        """A ticket for a new request, or ``Overloaded``."""
        self.check()
        ticket = self._next_ticket
        self._next_ticket += 1
        self._waiting[ticket] = time.perf_counter()
        self._on_depth(len(self._waiting))
        return ticket

    def stop_waiting(self, ticket: int) -> None:
        """The request reached the model, failed or was cancelled (idempotent)."""
        if self._waiting.pop(ticket, None) is not None:
            self._on_depth(len(self._waiting))

    def observe_batch(self, images: int, seconds: float) -> None:
        """The model ran a batch of ``images`` in ``seconds``: refresh the per-image time the
        expected wait is estimated with. Called from the inference thread."""
        now = time.perf_counter()
        # Requests were already waiting when the last batch ended: the pipeline has not idled since.
        busy = self._last_batch_end is not None and self._backlog_at_last_end > 0
        per_image = ((now - self._last_batch_end) if busy else seconds) / max(images, 1)
        self._last_batch_end, self._backlog_at_last_end = now, len(self._waiting)
        self._per_image_s = per_image if self._per_image_s == 0 else (1 - _EWMA) * self._per_image_s + _EWMA * per_image
