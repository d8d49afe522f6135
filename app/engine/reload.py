"""Model updates while serving (README, "Model updates"): a new model file, or a new version in a
model directory, is loaded beside the live model, checked, warmed up and swapped in atomically
(``InferenceService.swap``); a candidate that fails is refused, logged and counted, and the live
model stays.

What triggers a reload: a watch on the model path (``BTD_MODEL_WATCH``, watchfiles: inotify on
Linux) and SIGHUP. Not an HTTP endpoint: behind a Kubernetes Service a request reaches one replica,
while a file on the replicas' shared volume (or a new ConfigMap / image mount) reaches every one,
and each replica checks and swaps on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from app.core.model import ModelContractError, file_sha256, resolve_model_path
from app.engine import metrics
from app.engine.engine import Engine, EngineOptions
from app.engine.service import InferenceService

log = logging.getLogger("app.reload")

SWAPPED, UNCHANGED, REFUSED = metrics.RELOAD_RESULTS
WATCH_DEBOUNCE_MS = 1600  # changes within this window are one reload (a copy in progress writes many times)


def check_candidate(candidate: Engine, live: Engine) -> None:
    """What a model must pass beyond the contract check and warm-up of ``Engine.load`` before it
    replaces the live one: the same labels (clients read the answer's probabilities by label; a new
    label set is a new deployment) and finite logits on a probe image."""
    if tuple(candidate.metadata.labels) != tuple(live.metadata.labels):
        raise ModelContractError(f"its labels {list(candidate.metadata.labels)} differ from the live model's "
                                 f"{list(live.metadata.labels)}; changing labels needs a restart")
    spec = candidate.metadata.preprocess
    probe = np.random.default_rng(0).standard_normal((spec.channels, spec.size, spec.size)).astype(np.float32)
    (output,) = candidate.infer([probe], [False])
    if output.logits.shape != (len(candidate.metadata.labels),) or not np.all(np.isfinite(output.logits)):
        raise ModelContractError(f"it answers logits of shape {output.logits.shape} with non-finite values "
                                 "on a probe image")


class ModelReloader:
    """Reloads ``source`` (a model file or a model directory) into ``service`` on request."""

    def __init__(self, service: InferenceService, source: Path, options: EngineOptions) -> None:
        self.service = service
        self.source = Path(source)
        self.options = options
        self.fingerprint: tuple[Path, str] | None = None  # (file, sha256) of what the live model came from
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Note which file the live model came from (hashing it off the event loop); if it is gone
        already, the next reload loads whatever the path names then."""
        try:
            self.fingerprint = await asyncio.to_thread(self._fingerprint)
        except (OSError, ModelContractError) as exc:
            log.warning("model updates: cannot read %s now (%s); the next change is loaded", self.source, exc)

    def _fingerprint(self) -> tuple[Path, str]:
        file = resolve_model_path(self.source)
        return file, file_sha256(file)

    async def reload(self) -> str:
        """Load what the source names now and swap it in: ``swapped``, ``unchanged`` (the same file
        content as the live model's) or ``refused`` (logged; the live model stays)."""
        async with self._lock:  # one candidate at a time
            result = await self._reload()
        metrics.MODEL_RELOADS.labels(result).inc()
        return result

    async def _reload(self) -> str:
        try:
            fingerprint = await asyncio.to_thread(self._fingerprint)
        except (OSError, ModelContractError) as exc:
            log.error("model update refused: %s; still serving %s", exc, self._live_name())
            return REFUSED
        if self.fingerprint is not None and fingerprint[1] == self.fingerprint[1]:
            return UNCHANGED
        file = fingerprint[0]
        log.info("model update: loading %s (sha256 %s) beside the live model", file, fingerprint[1][:12])
        try:
            candidate = await asyncio.to_thread(Engine.load, file, self.options)
            await asyncio.to_thread(check_candidate, candidate, self.service.engine)
        except Exception as exc:  # any failure of the candidate: it is refused, the live model serves on
            log.error("model update refused: %s failed its checks (%s: %s); still serving %s", file,
                      type(exc).__name__, exc, self._live_name())
            return REFUSED
        old = await self.service.swap(candidate)
        self.fingerprint = fingerprint
        meta = candidate.metadata
        log.info("model update: now serving %s %s (%s, sha256 %s), was %s %s", meta.model_name, meta.model_version,
                 candidate.variant, candidate.model.sha256[:12], old.metadata.model_name, old.metadata.model_version)
        return SWAPPED

    def _live_name(self) -> str:
        meta = self.service.engine.metadata
        return f"{meta.model_name} {meta.model_version}"

    def relevant(self, changed: Iterable[str]) -> bool:
        """Whether changed paths may concern the model: anything in a model directory; for a model
        file, that file or Kubernetes' atomic ``..data`` link swap of a mounted volume."""
        if self.source.is_dir():
            return True
        return any(Path(p).name == self.source.name or Path(p).name.startswith("..") for p in changed)

    async def watch(self) -> None:
        """Reload on every relevant change under the model path, until cancelled."""
        from watchfiles import awatch

        target = self.source if self.source.is_dir() else self.source.parent
        log.info("watching %s for model updates (BTD_MODEL_WATCH)", target)
        async for changes in awatch(target, debounce=WATCH_DEBOUNCE_MS, recursive=self.source.is_dir()):
            if self.relevant(path for _, path in changes):
                await self.reload()
