"""``btd promote CANDIDATE --against CURRENT``: the change gate (README, "Model updates").

Both models are scored on the locked validation manifest (``models/validation-manifest.csv``: the
release split's validation rows with each file's sha256; ``btd lock-manifest`` writes it, and the
protocol pins the manifest's own sha256), and the candidate must be non-inferior to the current model
by the margins of the change protocol (``models/change-protocol.toml``): for tumour sensitivity,
specificity, ROC-AUC of the tumour probability and calibration (ECE), overall, and sensitivity and
specificity in each source/sequence group. Intervals come from a bootstrap over the manifest's groups
(patients or near-duplicate groups), paired: both models are scored on the same resampled images.

A margin holds when the interval of (candidate - current) lies above ``-margin`` (ECE, lower is
better: below ``+margin``). The change record (JSON and Markdown) holds the hashes of both models,
the manifest and the protocol, the figures with intervals, the margins and the decision; the command
exits 1 when a margin is broken.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
from sklearn.metrics import roc_auc_score

from app.core.contract import NO_TUMOUR_LABEL
from app.core.decision import calls_tumour, softmax, tumour_probability
from app.core.model import file_sha256
from model_export.evaluate import load_model, targets_for
from model_export.release_splits import write_release_splits
from model_export.samples import Sample
from model_export.scores import expected_calibration_error

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "models" / "change-protocol.toml"
MANIFEST_COLUMNS = ("path", "label", "group", "source", "sequence", "sha256")
# The MR sequence of each source's slices; lgg-tcga-t1's path names it (images/t1pre/..., images/t1post/...).
SOURCE_SEQUENCES = {"brain-mri-4class": "mixed", "figshare-cheng": "t1post", "lgg-tcga-flair": "flair"}
# The gated figures: name -> higher is better (ECE: lower is better).
METRICS = {"sensitivity": True, "specificity": True, "auc": True, "ece": False}
GROUP_METRICS = ("sensitivity", "specificity")
ACCEPTED, REFUSED = "accepted", "refused"


# --- the locked manifest ------------------------------------------------------------------------------

def sequence_of(path: str) -> str:
    source, _, rest = path.partition("/")
    if source in SOURCE_SEQUENCES:
        return SOURCE_SEQUENCES[source]
    parts = rest.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "images" else "unknown"


def write_manifest(data: Path, out: Path) -> str:
    """The release split's validation rows with each file's sha256, to ``out``; returns its sha256."""
    with tempfile.TemporaryDirectory() as tmp:
        splits = Path(tmp) / "release-splits.csv"
        write_release_splits(Path(data), splits)
        with splits.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for r in sorted(rows, key=lambda r: r["path"]):
            writer.writerow((r["path"], r["label"], r["group"], r["path"].split("/", 1)[0], sequence_of(r["path"]),
                             file_sha256(Path(data) / r["path"])))
    return file_sha256(out)


@dataclass(frozen=True)
class ManifestRow:
    path: str
    label: str
    group: str
    source: str
    sequence: str
    sha256: str

    @property
    def stratum(self) -> str:
        return f"{self.source}/{self.sequence}"


def read_manifest(path: Path, data: Path, verify: bool = True) -> list[ManifestRow]:
    """The manifest's rows; with ``verify``, every file must exist under ``data`` with its sha256."""
    with Path(path).open(newline="") as fh:
        rows = [ManifestRow(**{k: r[k] for k in MANIFEST_COLUMNS}) for r in csv.DictReader(fh)]
    if not rows:
        raise ValueError(f"the manifest {path} has no rows")
    if verify:
        changed = [r.path for r in rows if not (data / r.path).is_file() or file_sha256(data / r.path) != r.sha256]
        if changed:
            raise ValueError(f"{len(changed)} manifest file(s) are missing or changed under {data}, e.g. "
                             f"{changed[0]}: the validation set is locked (btd lock-manifest writes a new one)")
    return rows


# --- the protocol -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    margins: dict[str, float]
    group_margins: dict[str, float]
    group_min_cases: int
    confidence: float
    bootstrap: int
    seed: int
    manifest: Path | None  # relative to the protocol file
    manifest_sha256: str | None

    @classmethod
    def read(cls, path: Path) -> Protocol:
        with Path(path).open("rb") as fh:
            raw = tomllib.load(fh)
        gate, margins, groups = raw["gate"], raw["margins"], raw["margins"]["per_sequence"]
        unknown = set(margins) - set(METRICS) - {"per_sequence"}
        if unknown or set(METRICS) - set(margins):
            raise ValueError(f"{path}: [margins] must name exactly {', '.join(METRICS)} (and per_sequence)")
        manifest = raw.get("manifest", {})
        return cls({k: float(margins[k]) for k in METRICS}, {k: float(groups[k]) for k in GROUP_METRICS},
                   int(groups.get("min_cases", 0)), float(gate["confidence"]), int(gate["bootstrap"]),
                   int(gate.get("seed", 0)),
                   (Path(path).parent / manifest["path"]) if "path" in manifest else None,
                   manifest.get("sha256"))


# --- the figures --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scored:
    """One model's answers on the manifest: calibrated probabilities, tumour probability and call,
    and the true class in the model's label order."""

    probs: np.ndarray
    tumour: np.ndarray
    called: np.ndarray
    y: np.ndarray


def score(logits: np.ndarray, labels: Sequence[str], truth: Sequence[str], temperature: float,
          threshold: float) -> Scored:
    """The service's decision (``app.core.decision``) on each image's logits."""
    if NO_TUMOUR_LABEL not in labels:
        raise ValueError(f"the model has no {NO_TUMOUR_LABEL!r} class: it makes no tumour decision to gate")
    probs = softmax(logits, temperature)
    tumour = tumour_probability(probs, labels)
    return Scored(probs, tumour, calls_tumour(tumour, threshold), targets_for([Sample(Path(), t) for t in truth],
                                                                               labels))


def figures(s: Scored, is_tumour: np.ndarray, metrics: Sequence[str] = tuple(METRICS)) -> dict[str, float]:
    """Sensitivity, specificity, ROC-AUC of the tumour probability and top-label ECE of one model on
    some images (nan where undefined); only ``metrics`` are computed."""
    pos, neg = is_tumour, ~is_tumour
    compute = {
        "sensitivity": lambda: float(s.called[pos].mean()) if pos.any() else float("nan"),
        "specificity": lambda: float((~s.called[neg]).mean()) if neg.any() else float("nan"),
        "auc": lambda: float(roc_auc_score(is_tumour, s.tumour)) if pos.any() and neg.any() else float("nan"),
        "ece": lambda: expected_calibration_error(s.probs, s.y) if len(s.y) else float("nan"),
    }
    return {m: compute[m]() for m in metrics}


def take(s: Scored, idx: np.ndarray) -> Scored:
    return Scored(s.probs[idx], s.tumour[idx], s.called[idx], s.y[idx])


def bootstrap_indices(groups: Sequence[str], n: int, seed: int) -> list[np.ndarray]:
    """``n`` resamples of the images by group (a patient's slices go together)."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = [np.array(v) for v in members.values()]
    rng = np.random.default_rng(seed)
    return [np.concatenate([blocks[j] for j in rng.integers(0, len(blocks), len(blocks))]) for _ in range(n)]


def interval(values: Sequence[float], confidence: float) -> list[float | None]:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return [None, None]
    alpha = (1.0 - confidence) / 2
    return [float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))]


def compare(current: Scored, candidate: Scored, is_tumour: np.ndarray, margins: dict[str, float],
            resamples: list[np.ndarray], confidence: float, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each metric: both models' values and intervals, the paired difference and its interval, the
    margin and whether it holds."""
    point = (figures(current, is_tumour, metrics), figures(candidate, is_tumour, metrics))
    boots: dict[str, list[list[float]]] = {m: [[], [], []] for m in metrics}
    for idx in resamples:
        a = figures(take(current, idx), is_tumour[idx], metrics)
        b = figures(take(candidate, idx), is_tumour[idx], metrics)
        for m in metrics:
            boots[m][0].append(a[m])
            boots[m][1].append(b[m])
            boots[m][2].append(b[m] - a[m])
    out = {}
    for m in metrics:
        diff_ci = interval(boots[m][2], confidence)
        higher_better = METRICS[m]
        if diff_ci[0] is None:
            holds = None  # not defined on these images (e.g. no tumour-free slice in a group)
        elif higher_better:
            holds = diff_ci[0] >= -margins[m]
        else:
            holds = diff_ci[1] <= margins[m]
        out[m] = {"current": _num(point[0][m]), "current_ci": interval(boots[m][0], confidence),
                  "candidate": _num(point[1][m]), "candidate_ci": interval(boots[m][1], confidence),
                  "difference": _num(point[1][m] - point[0][m]), "difference_ci": diff_ci,
                  "margin": margins[m], "better": "higher" if higher_better else "lower", "holds": holds}
    return out


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


# --- the gate -----------------------------------------------------------------------------------------

def model_facts(path: Path) -> dict[str, Any]:
    from app.core.model import ModelFile

    model = ModelFile.load(path)
    return {"path": str(path), "sha256": model.sha256, "name": model.metadata.model_name,
            "version": model.metadata.model_version}


def gate(current_logits: np.ndarray, candidate_logits: np.ndarray, rows: Sequence[ManifestRow],
         current: Any, candidate: Any, protocol: Protocol) -> dict[str, Any]:
    """The figures and the decision. ``current`` / ``candidate``: labels, temperature and threshold
    (``model_export.evaluate.Model``)."""
    truth = [r.label for r in rows]
    is_tumour = np.array([t != NO_TUMOUR_LABEL for t in truth])
    a = score(current_logits, current.labels, truth, current.temperature, current.threshold)
    b = score(candidate_logits, candidate.labels, truth, candidate.temperature, candidate.threshold)
    resamples = bootstrap_indices([r.group for r in rows], protocol.bootstrap, protocol.seed)
    overall = compare(a, b, is_tumour, protocol.margins, resamples, protocol.confidence, list(METRICS))
    strata = np.array([r.stratum for r in rows])
    per_sequence = {}
    for stratum in sorted(set(strata)):
        members = np.flatnonzero(strata == stratum)
        local = [idx[strata[idx] == stratum] for idx in resamples]  # the same resamples, this group's part
        result = compare(take(a, members), take(b, members), is_tumour[members], protocol.group_margins,
                         [np.searchsorted(members, idx) for idx in local], protocol.confidence, GROUP_METRICS)
        cases = {"sensitivity": int(is_tumour[members].sum()), "specificity": int((~is_tumour[members]).sum())}
        for m in GROUP_METRICS:
            result[m]["cases"] = cases[m]
            if cases[m] < protocol.group_min_cases:
                result[m]["holds"] = None  # too few cases to judge: reported, not gated
        per_sequence[stratum] = {"images": len(members), **result}
    broken = [f"{m}" for m, r in overall.items() if r["holds"] is False]
    broken += [f"{s} {m}" for s, r in per_sequence.items() for m in GROUP_METRICS if r[m]["holds"] is False]
    return {"decision": REFUSED if broken else ACCEPTED, "broken": broken, "figures": overall,
            "per_sequence": per_sequence}


FEEDBACK_TABLE = "reader_feedback"  # readers' readings of answered predictions (one per prediction and reader)


def wilson(hits: int, n: int, confidence: float) -> list[float | None]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return [None, None]
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = hits / n
    centre, half = (p + z * z / (2 * n)), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [float((centre - half) / (1 + z * z / n)), float((centre + half) / (1 + z * z / n))]


def confirmed_figures(calls: dict[int, bool | None], truth: dict[int, bool], confidence: float) -> dict[str, Any]:
    """Sensitivity and specificity of one model's recorded tumour decisions against readers' findings."""
    cases = [(calls[k], truth[k]) for k in calls if k in truth and calls[k] is not None]
    pos = [call for call, present in cases if present]
    neg = [not call for call, present in cases if not present]
    return {"cases": len(cases),
            "sensitivity": sum(pos) / len(pos) if pos else None, "sensitivity_ci": wilson(sum(pos), len(pos), confidence),
            "specificity": sum(neg) / len(neg) if neg else None, "specificity_ci": wilson(sum(neg), len(neg), confidence)}


def confirmed_cases(url: str | None, current_sha: str, candidate_sha: str, confidence: float) -> dict[str, Any]:
    """Both models' tumour decisions on the cases readers confirmed (the records database's
    ``reader_feedback``): the current model's are its prediction records, the candidate's its own
    records (when it was live) or its shadow comparisons. Reported beside the gate, not gating: readers
    choose which answers they confirm, so these cases are not a sample of the intended use."""
    if url is None:
        return {"status": "not asked (no --database)"}
    from sqlalchemy import MetaData, create_engine, select

    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        if FEEDBACK_TABLE not in meta.tables or "prediction_records" not in meta.tables:
            return {"status": f"unavailable: the database has no {FEEDBACK_TABLE} table (readers' feedback is "
                              "not deployed there); the decision rests on the validation manifest alone"}
        feedback, records = meta.tables[FEEDBACK_TABLE], meta.tables["prediction_records"]
        shadow = meta.tables.get("shadow_comparisons")
        with engine.connect() as connection:
            readings = connection.execute(
                select(records.c.id, records.c.request_id, records.c.item, records.c.model_sha256,
                       records.c.tumour_detected, feedback.c.tumour_present)
                .join(records, feedback.c.prediction_id == records.c.id)
                .where(feedback.c.tumour_present.is_not(None))).all()
            shadowed = {} if shadow is None else {
                (r.request_id, r.item): r.shadow_tumour_detected for r in connection.execute(
                    select(shadow.c.request_id, shadow.c.item, shadow.c.shadow_tumour_detected)
                    .where(shadow.c.shadow_model_sha256 == candidate_sha))}
    finally:
        engine.dispose()
    findings: dict[int, set[bool]] = {}
    for r in readings:
        findings.setdefault(r.id, set()).add(bool(r.tumour_present))
    truth = {k: next(iter(v)) for k, v in findings.items() if len(v) == 1}  # readers who disagree: left out
    current = {r.id: r.tumour_detected for r in readings if r.model_sha256 == current_sha}
    candidate = {r.id: r.tumour_detected for r in readings if r.model_sha256 == candidate_sha}
    candidate.update({r.id: shadowed[(r.request_id, r.item)] for r in readings
                      if r.id not in candidate and (r.request_id, r.item) in shadowed})
    return {"status": f"{len(truth)} confirmed cases ({len(findings) - len(truth)} left out: readers disagree); "
                      "reported, not gating",
            "current": confirmed_figures(current, truth, confidence),
            "candidate": confirmed_figures(candidate, truth, confidence)}


def promote(candidate_path: Path, current_path: Path, *, protocol_path: Path = PROTOCOL,
            manifest_path: Path | None = None, data: Path, database: str | None = None, batch_size: int = 16,
            threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
            verify: bool = True) -> dict[str, Any]:
    """Score both models on the manifest and judge the candidate: the change record."""
    protocol = Protocol.read(protocol_path)
    manifest_path = manifest_path or protocol.manifest
    if manifest_path is None:
        raise ValueError(f"{protocol_path} names no manifest and none was given (--manifest)")
    manifest_sha = file_sha256(manifest_path)
    locked = protocol.manifest is not None and Path(manifest_path).resolve() == protocol.manifest.resolve()
    if locked and protocol.manifest_sha256 not in (None, manifest_sha):
        raise ValueError(f"the manifest {manifest_path} (sha256 {manifest_sha}) is not the one the protocol "
                         f"locks ({protocol.manifest_sha256})")
    rows = read_manifest(manifest_path, data, verify)
    samples = [Sample(data / r.path, r.label) for r in rows]
    models = {}
    logits = {}
    for role, path in (("current", current_path), ("candidate", candidate_path)):
        models[role] = load_model(path, threads, providers)
        log.info("scoring the %s model %s on %d manifest images", role, path, len(samples))
        logits[role] = models[role].logits(samples, batch_size, role)
    verdict = gate(logits["current"], logits["candidate"], rows, models["current"], models["candidate"], protocol)
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "decision": verdict["decision"], "broken": verdict["broken"],
        "candidate": model_facts(candidate_path), "current": model_facts(current_path),
        "manifest": {"path": str(manifest_path), "sha256": manifest_sha, "images": len(rows),
                     "tumour_images": sum(r.label != NO_TUMOUR_LABEL for r in rows),
                     "groups": len({r.group for r in rows})},
        "protocol": {"path": str(protocol_path), "sha256": file_sha256(protocol_path),
                     "confidence": protocol.confidence, "bootstrap": protocol.bootstrap, "seed": protocol.seed,
                     "margins": protocol.margins, "per_sequence_margins": protocol.group_margins,
                     "per_sequence_min_cases": protocol.group_min_cases},
        "figures": verdict["figures"], "per_sequence": verdict["per_sequence"],
        "confirmed_cases": confirmed_cases(database, file_sha256(current_path), file_sha256(candidate_path),
                                           protocol.confidence),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ci(ci: list[float | None]) -> str:
    return "n/a" if ci[0] is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _holds(holds: bool | None) -> str:
    return {True: "holds", False: "**broken**", None: "not judged"}[holds]


def markdown(record: dict[str, Any]) -> str:
    c, k = record["candidate"], record["current"]
    p = record["protocol"]
    manifest = record["manifest"]
    broken = f" (broken: {', '.join(record['broken'])})" if record["broken"] else ""
    lines = [
        f"# Change record: {c['name']} {c['version']} against {k['name']} {k['version']}", "",
        f"**Decision: {record['decision']}**{broken}", "",
        "| | file | sha256 |", "|---|---|---|",
        f"| candidate | `{c['path']}` | `{c['sha256']}` |",
        f"| current | `{k['path']}` | `{k['sha256']}` |",
        (f"| manifest | `{manifest['path']}` ({manifest['images']} images, {manifest['groups']} groups) | "
         f"`{manifest['sha256']}` |"),
        f"| protocol | `{p['path']}` | `{p['sha256']}` |", "",
        (f"Intervals: {p['confidence']:.0%} paired bootstrap over the manifest's groups ({p['bootstrap']} "
         "resamples). A margin holds when the interval of (candidate - current) stays above -margin "
         "(ECE: below +margin)."), "",
        "| metric | current | candidate | difference | margin | |", "|---|---|---|---|---|---|",
    ]
    for m, r in record["figures"].items():
        lines.append(f"| {m} | {_fmt(r['current'])} {_ci(r['current_ci'])} | {_fmt(r['candidate'])} "
                     f"{_ci(r['candidate_ci'])} | {_fmt(r['difference'])} {_ci(r['difference_ci'])} | "
                     f"{r['margin']:g} | {_holds(r['holds'])} |")
    lines += ["", "Per source/sequence:", "",
              "| group | images | metric | cases | current | candidate | difference | margin | |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s, g in record["per_sequence"].items():
        for m in GROUP_METRICS:
            r = g[m]
            lines.append(f"| {s} | {g['images']} | {m} | {r['cases']} | {_fmt(r['current'])} | "
                         f"{_fmt(r['candidate'])} | {_fmt(r['difference'])} {_ci(r['difference_ci'])} | "
                         f"{r['margin']:g} | {_holds(r['holds'])} |")
    confirmed = record["confirmed_cases"]
    lines += ["", f"Readers' confirmed cases: {confirmed['status']}.", ""]
    if "current" in confirmed:
        lines += ["| model | cases | sensitivity | specificity |", "|---|---|---|---|"]
        for role in ("current", "candidate"):
            r = confirmed[role]
            lines.append(f"| {role} | {r['cases']} | {_fmt(r['sensitivity'])} {_ci(r['sensitivity_ci'])} | "
                         f"{_fmt(r['specificity'])} {_ci(r['specificity_ci'])} |")
        lines.append("")
    return "\n".join(lines)


def write_record(record: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "change-record.json", out / "change-record.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(markdown(record))
    return json_path, md_path
