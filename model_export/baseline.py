"""``btd baseline``: measure a model's drift baseline on its validation split and stamp it into the
ONNX file (metadata ``btd.baseline``, ``app.core.baseline``).

Each image goes the service's way: its bytes through ``prepare`` (the service's decoder, framing and
intended-use gate), the model file through ONNX Runtime, the outputs through the one ``decide``; so
the baseline holds what the service would have recorded for these images. Only the metadata changes:
the graph (and every weight) is checked byte for byte after writing, so the model's answers cannot
change; its file sha256 does.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from app.core.baseline import Baseline, build_baseline, signal_values
from app.core.contract import INPUT_NAME, LOGITS_NAME, META_BASELINE, OOD_NAME
from app.core.decision import decide
from app.core.model import ModelFile, read_proto
from model_export.data import Sample, limit_per_class, load_samples, select, summarise
from model_export.options import BaselineConfig

log = logging.getLogger(__name__)


def measure(model: ModelFile, samples: Sequence[Sample], *, batch_size: int = 16,
            threads: int = 0) -> tuple[list[dict], list[tuple[float, ...]]]:
    """(each image's drift-signal values, each image's raw intensity percentiles), as the service sees them."""
    from app.engine.pipeline import PrepareOptions, prepare
    from app.engine.runner import RuntimeOptions, open_session

    meta = model.metadata
    session = open_session(model.path, RuntimeOptions(providers=("CPUExecutionProvider",), intra_op_threads=threads),
                           channels=meta.preprocess.channels, size=meta.preprocess.size)
    options = PrepareOptions(spec=meta.preprocess, validated=meta.validated)
    outputs = [LOGITS_NAME, OOD_NAME] if model.has_ood else [LOGITS_NAME]
    answers, percentiles = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="baseline", unit="batch", leave=False):
        prepared = [prepare(Path(s.path).read_bytes(), None, options) for s in samples[start : start + batch_size]]
        results = session.run(outputs, {INPUT_NAME: np.stack([p.tensor for p in prepared])})
        scores = results[1] if model.has_ood else [None] * len(prepared)
        for p, logits, score in zip(prepared, results[0], scores):
            decision = decide(logits, meta.labels, temperature=meta.temperature, threshold=meta.tumour_threshold,
                              ood_score=None if score is None else float(score),
                              ood_threshold=None if meta.ood is None else meta.ood.threshold,
                              image_reasons=p.image_reasons)
            facts = p.facts.percentiles if p.facts is not None else None
            answers.append(signal_values(label=decision.label, assessed=decision.assessed,
                                         tumour_probability=decision.tumour_probability,
                                         ood_score=decision.ood_score, percentiles=facts))
            if facts is not None:
                percentiles.append(facts)
    return answers, percentiles


def graph_sha256(proto: onnx.ModelProto) -> str:
    """sha256 of the serialized graph: nodes and every initializer (weights), not the metadata."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def stamp(path: Path, baseline: Baseline, out: Path | None = None) -> Path:
    """Write ``baseline`` into the metadata of the model at ``path`` (to ``out``, default in place);
    raises RuntimeError, leaving no file, when the graph written is not the graph read."""
    path = Path(path)
    out = Path(out) if out is not None else path
    proto = read_proto(path)
    before = graph_sha256(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    props[META_BASELINE] = baseline.to_json()
    del proto.metadata_props[:]
    helper.set_model_props(proto, props)
    tmp = out.with_name(out.name + ".partial")
    onnx.save(proto, str(tmp))
    try:
        after = graph_sha256(onnx.load(str(tmp)))
        if after != before:
            raise RuntimeError(f"stamping the baseline changed the graph of {path} ({before[:12]} -> {after[:12]})")
        ModelFile.load(tmp)  # still a model the service loads
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def main(config: BaselineConfig) -> Path:
    model = ModelFile.load(config.model)
    samples = load_samples(config.data, config.split_file, seed=config.seed, **config.columns)
    chosen = limit_per_class(select(samples, config.split), config.limit_per_class, config.seed)
    if not chosen:
        raise ValueError(f"no images in split {config.split!r}")
    counts = summarise(chosen)["per_split"].get(config.split, {})
    stored = model.metadata.training_data.get("per_split", {}).get(config.split)
    if stored is not None and stored != counts:  # another split than the model's own: say so, go on
        log.warning("the %s split has %s, the model's training data summary says %s", config.split, counts, stored)
    answers, percentiles = measure(model, chosen, batch_size=config.batch_size, threads=config.threads)
    source = {"split": config.split, "split_file": Path(config.split_file).name if config.split_file else None,
              "per_class": counts, "model": Path(config.model).name, "model_graph_sha256": graph_sha256(
                  read_proto(model.path))}
    baseline = build_baseline(answers, model.metadata.labels, percentiles=percentiles, source=source)
    if config.values is not None:  # the per-image values, to study bins and thresholds without rerunning
        np.savez_compressed(config.values, **{name: np.asarray([a[name] for a in answers], dtype=object)
                                              for name in answers[0]}, percentiles=np.asarray(percentiles))
    out = stamp(model.path, baseline, config.out)
    log.info("baseline of %d %s images stamped into %s", len(answers), config.split, out)
    return out
