"""Admission control: refuse at once when too many requests wait or the oldest has waited too long,
with a Retry-After from the measured model speed."""

import time

import pytest

from app.core.errors import Overloaded
from app.engine.admission import RETRY_AFTER_MAX_S, Admission


def test_a_full_queue_is_refused_with_retry_after():
    depths: list[int] = []
    admission = Admission(max_waiting=2, max_wait_s=10.0, on_depth=depths.append)
    first, second = admission.admit(), admission.admit()
    with pytest.raises(Overloaded, match="queue is full") as refused:
        admission.admit()
    assert refused.value.status == 503 and int(refused.value.headers["Retry-After"]) >= 1
    admission.stop_waiting(first)
    admission.stop_waiting(first)  # idempotent
    admission.admit()
    assert depths == [1, 2, 1, 2]
    assert second != first


def test_a_queue_that_does_not_drain_is_refused_until_it_does():
    admission = Admission(max_waiting=100, max_wait_s=0.05)
    stuck = admission.admit()
    time.sleep(0.08)
    with pytest.raises(Overloaded, match="not draining"):
        admission.admit()
    admission.stop_waiting(stuck)  # it reached the model
    admission.admit()


def test_a_burst_is_admitted_only_as_far_as_the_model_can_serve_it_in_time():
    admission = Admission(max_waiting=1000, max_wait_s=0.5)
    admission.observe_batch(4, 0.2)  # 50 ms an image
    admitted = 0
    with pytest.raises(Overloaded, match="need about") as refused:
        for _ in range(100):
            admission.admit()
            admitted += 1
    assert admitted == 10  # the tenth waits 10 x 50 ms = the limit; the eleventh would wait longer
    assert int(refused.value.headers["Retry-After"]) == 1


def test_retry_after_follows_the_measured_model_speed():
    admission = Admission(max_waiting=1000, max_wait_s=1000.0)
    assert admission.retry_after_s() == 1  # nothing measured yet
    admission.observe_batch(8, 0.8)  # 0.1 s an image
    for _ in range(49):
        admission.admit()
    assert admission.retry_after_s() == 5  # 50 images at 0.1 s
    for _ in range(900):
        admission.admit()
    assert admission.retry_after_s() == RETRY_AFTER_MAX_S


def test_while_requests_wait_the_speed_is_the_time_between_batches():
    admission = Admission(max_waiting=1000, max_wait_s=1000.0)
    admission.observe_batch(1, 0.01)  # nothing waits after it
    time.sleep(0.2)  # idle
    admission.admit()
    admission.observe_batch(1, 0.01)  # after an idle spell: the model's own 10 ms, not the idle time
    assert admission.expected_wait_s() == pytest.approx(2 * 0.01)
    time.sleep(0.1)
    admission.observe_batch(1, 0.01)  # busy since: the pipeline delivered one image in ~100 ms, not 10
    assert admission.expected_wait_s() > 2 * 0.02


def test_an_empty_queue_admits_after_a_slow_spell_and_the_estimate_recovers():
    # A slow spell (3 s an image) left a per-image estimate over the limit: with nobody waiting the
    # next request is still admitted (it refreshes the estimate); behind it, the estimate refuses.
    admission = Admission(max_waiting=100, max_wait_s=1.0)
    admission.observe_batch(1, 3.0)
    ticket = admission.admit()
    with pytest.raises(Overloaded, match="need about"):
        admission.admit()
    admission.stop_waiting(ticket)
    for _ in range(20):
        admission.observe_batch(1, 0.01)  # the machine is fast again
    admission.admit()
    admission.admit()
