"""Where the host work of a request runs: decoding and preprocessing (``pipeline.prepare``) and the
CAM images (``postprocess.cam_images``), off the event loop.

- ``ProcessHost``: a pool of worker processes (pebble's ``ProcessPool``). Host work then scales with
  cores instead of stopping at one Python process (~430 slices/s on the GPU node), and a worker is
  also an isolation boundary: a task past its time limit gets its worker killed and replaced, a
  worker that crashes (a decoder bug on a hostile file) fails only its own task and is replaced,
  and a per-worker address-space limit turns a memory bomb into a 413 in that worker.
- ``ThreadHost``: threads in the server process (OpenCV releases the GIL while decoding); no
  isolation, no copying of images between processes.
- ``MixedHost``: threads, with DICOM decoding in worker processes (the CPU default).

The README's "The inference engine" says why one server process feeds one model owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, TypeVar

from app.core.errors import DecodeTooCostly, InvalidImage, PayloadTooLarge
from app.engine import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class HostWork(Protocol):
    workers: int
    kind: str  # "processes" or "threads"
    isolated: str  # which decodes run in a worker process: "all", "dicom" or "none"

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def run_isolated(self, fn: Callable[..., T], *args: Any) -> T:
        """Where a decoder that holds the GIL or may crash runs (pydicom and its codecs)."""
        ...

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


class ThreadHost:
    """Host work in threads of the server process."""

    kind = "threads"
    isolated = "none"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="btd-host")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    run_isolated = run  # BTD_HOST_WORKERS=0 asks for no worker process at all

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _init_worker(memory_limit_bytes: int | None) -> None:
    """In each worker: one OpenCV thread (the pool is the parallelism), and the address-space limit."""
    import cv2

    from app.engine.malloc import return_freed_memory

    return_freed_memory()
    cv2.setNumThreads(1)
    if memory_limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))


def _ready() -> bool:
    return True


class ProcessHost:
    """Host work in ``workers`` processes, each task limited to ``task_timeout_s`` (its worker is
    killed and replaced past it) and each worker to ``memory_limit_bytes`` of address space."""

    kind = "processes"
    isolated = "all"

    def __init__(self, workers: int, *, task_timeout_s: float | None = None,
                 memory_limit_bytes: int | None = None) -> None:
        from pebble import ProcessPool

        self.workers = workers
        self.task_timeout_s = task_timeout_s
        # forkserver: workers start from a clean, single-threaded server process (never a fork of
        # this one with its ORT and event-loop threads), with the decoding modules already imported:
        # pydicom and its pixel decoders too (imported lazily by the decoder, 0.24 s), so a replaced
        # worker's first DICOM pays for decoding only, and the task time limit measures just that.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["app.engine.pipeline", "pydicom", "pydicom.pixels"])
        self._pool = ProcessPool(max_workers=workers, initializer=_init_worker, initargs=(memory_limit_bytes,),
                                 context=context)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        future = self._pool.schedule(fn, args, timeout=self.task_timeout_s)
        with self._worker_failures():
            return await asyncio.wrap_future(future)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``run`` for a caller without an event loop (``btd dicom-listen``'s threads): blocks."""
        future = self._pool.schedule(fn, args, timeout=self.task_timeout_s)
        with self._worker_failures():
            return future.result()

    @contextlib.contextmanager
    def _worker_failures(self) -> Iterator[None]:
        """A worker's time limit, crash or memory limit as the typed error a client gets."""
        from pebble import ProcessExpired

        try:
            yield
        except FutureTimeout:
            metrics.HOST_WORKER_FAILURES.labels("timeout").inc()
            raise DecodeTooCostly(f"decoding took longer than {self.task_timeout_s:g} s; the decoder was stopped") from None
        except ProcessExpired as exc:
            metrics.HOST_WORKER_FAILURES.labels("crash").inc()
            log.warning("a host worker ended while working on a request (exit code %s); it was replaced", exc.exitcode)
            raise InvalidImage("the image could not be decoded: the decoder process failed on it") from None
        except MemoryError:
            metrics.HOST_WORKER_FAILURES.labels("memory").inc()
            raise PayloadTooLarge("decoding this image needs more memory than a decoder may use") from None

    async def run_isolated(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.run(fn, *args)

    def warm_up(self) -> None:
        """Start every worker now (imports take a while) rather than on the first requests."""
        futures = [self._pool.schedule(_ready) for _ in range(self.workers * 2)]
        for future in futures:
            future.result(timeout=120)

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=10)


class MixedHost:
    """Threads for the work OpenCV does with the GIL released (PNG, JPEG, CAM images), and worker
    processes for DICOM: pydicom and its codecs hold the GIL (a large JPEG 2000 frame would stall
    /livez for seconds) and a codec may crash on a hostile file (python-gdcm aborts the process).
    The CPU default: the model keeps the cores, and the isolation costs one idle process."""

    kind = "threads"
    isolated = "dicom"

    def __init__(self, threads: ThreadHost, processes: ProcessHost) -> None:
        self.threads = threads
        self.processes = processes
        self.workers = threads.workers

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.threads.run(fn, *args)

    async def run_isolated(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.processes.run(fn, *args)

    def warm_up(self) -> None:
        self.processes.warm_up()

    def close(self) -> None:
        self.threads.close()
        self.processes.close()
