"""``btd predict``: classify image files with the local model or a running service.

    btd predict scans/ extra.dcm 'more/**/*.png'                # the shipped model, on this machine
    btd predict --url http://127.0.0.1:8000 scans/ --format csv  # a running service
    btd predict scans/ --cam-dir cams/                           # also write CAM overlays as PNG
    btd predict --series study/series3/                          # a folder of DICOM instances: one series
    btd predict brain.nii.gz                                     # a NIfTI volume: a series of axial slices

PATHs are files, folders (searched recursively) or glob patterns. In folders, files count as
images by extension (.png .jpg .jpeg .dcm .dicom) or by signature (DICOM often has no extension);
a file named explicitly is always sent. A service with API keys needs ``--api-key`` or
``BTD_API_KEY``. Exit status: 0 all files classified, 1 some file failed (each with its reason in
the output), 2 nothing could be done (no model, no service, no input, no valid API key), 141 the
reader closed the output early (``| head``), as for any Unix tool killed by SIGPIPE.

A series (``--series DIR``: each folder one series of DICOM instances; or a NIfTI file, ``.nii`` /
``.nii.gz``, recognised by name or header) prints each slice's result in slice order and the series
finding (``app.core.series``: the rule and its measured figures are in the README's "Series").

Local mode uses ``app.engine.engine.Engine`` at batch 1 (ONNX Runtime, no torch, no server); URL
mode uses httpx and sends each file's bytes with its media type. Registered as a subcommand by
``app.transports.cli.btd`` through :func:`add_predict_parser`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import glob
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from app.core.decode import DICOM, media_type_for_path, sniff
from app.core.formats import SIGNATURE_BYTES
from app.core.nifti import looks_like_nifti
from app.core.result import NOT_ASSESSED_PHRASES, OOD_PHRASE, CamPng, Prediction
from app.core.series import SeriesResult

if TYPE_CHECKING:
    from app.engine.engine import Engine

FORMATS = ("table", "csv", "json")
GLOB_CHARS = set("*?[")

EXIT_OK, EXIT_SOME_FAILED, EXIT_UNUSABLE = 0, 1, 2
EXIT_OUTPUT_CLOSED = 128 + 13  # what a shell reports for a tool killed by SIGPIPE
API_KEY_ENV = "BTD_API_KEY"


class Unusable(Exception):
    """Nothing can be classified (model missing, service unreachable, no input): exit status 2."""


@dataclass
class Outcome:
    """What happened to one input file."""

    path: str
    result: Prediction | None = None
    error: str | None = None
    cam_file: str | None = None
    dicom_files: list[str] | None = None

    series: SeriesResult | None = None  # a series input's result (its slices and finding)

    @property
    def ok(self) -> bool:
        return self.error is None


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """A NIfTI volume by name, or (a file named explicitly) by its single-file NIfTI header."""
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(SIGNATURE_BYTES + 540)
    except OSError:
        return False
    return not head.startswith(b"\x1f\x8b") and looks_like_nifti(head)


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a series folder (by signature, recursively, hidden ones left out), sorted."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        with open(path, "rb") as f:
            if sniff(f.read(SIGNATURE_BYTES)) == DICOM:
                found.append(path)
    return found


# ---------------------------------------------------------------- finding the files


def looks_like_image(path: Path) -> bool:
    if media_type_for_path(path) or path.name.lower().endswith(NIFTI_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return sniff(f.read(SIGNATURE_BYTES)) is not None
    except OSError:
        return False


def collect_inputs(args: Sequence[str]) -> tuple[list[Path], list[Outcome]]:
    """Expand PATH arguments into image files (in a stable order, each once) and failures for
    arguments that name nothing."""
    files: list[Path] = []
    missing: list[Outcome] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            images = [child for child in sorted(p for p in path.rglob("*") if p.is_file())
                      if not any(part.startswith(".") for part in child.relative_to(path).parts)
                      and looks_like_image(child)]
            if not images:  # as for a pattern that matches nothing: say so, never pass silently
                missing.append(Outcome(arg, error="no image file in this folder"))
            for child in images:
                add(child)
        elif path.is_file():
            add(path)
        elif GLOB_CHARS & set(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True))
            images = [m for m in matches if m.is_file() and looks_like_image(m)]
            if not images:
                missing.append(Outcome(arg, error="no image file matches this pattern"))
            for match in images:
                add(match)
        else:
            missing.append(Outcome(arg, error="no such file or folder"))
    return files, missing


def media_type_of(data: bytes, path: Path) -> str | None:
    """The bytes' signature decides; the extension is a fallback (the service then explains)."""
    return sniff(data[:SIGNATURE_BYTES]) or media_type_for_path(path)


# ---------------------------------------------------------------- the two back ends

Classify = Callable[[Path], Prediction]  # raises FileFailed on failure
ClassifySeries = Callable[[Path], SeriesResult]  # a series folder or a NIfTI file; raises FileFailed


@dataclass
class Backend:
    classify: Classify
    classify_series: ClassifySeries
    model: dict[str, Any]
    close: Callable[[], None]


class FileFailed(Exception):
    """One file could not be classified; the message is the reason shown to the user."""


def model_path_of(args: argparse.Namespace) -> Path:
    """``--model``, else ``BTD_MODEL_PATH`` (the settings), else the shipped model."""
    from app.settings import InvalidSettings, load_settings

    try:
        return Path(args.model) if args.model else load_settings().model_path
    except InvalidSettings as exc:
        raise Unusable(f"invalid settings:\n{textwrap.indent(str(exc), '  ')}") from None


def open_engine(model_path: Path, advice: str = "") -> Engine:
    """The model file in this process at batch 1, with the service's settings (``BTD_MODEL_VARIANT``,
    threads, threshold); Unusable when it is missing or breaks the contract."""
    if not model_path.is_file():
        raise Unusable(f"model file not found: {model_path}. Export one (btd export), pass --model FILE"
                       f"{', ' + advice if advice else ''}.")
    from app.engine.engine import Engine
    from app.settings import Settings

    try:
        return Engine.load_single(model_path, Settings().engine_options())
    except (ValueError, OSError) as exc:
        raise Unusable(f"cannot load the model {model_path}: {exc}") from None


def local_classifier(model_path: Path, cam: str,
                     store: str | None = None) -> tuple[Classify, dict[str, Any], Callable[[], None]]:
    """Classify with the model file in this process. Returns the function, the model's identity and
    a closer (which writes the records, with ``store``: ``--store``)."""
    backend = local_backend(model_path, cam, store)
    return backend.classify, backend.model, backend.close


def local_backend(model_path: Path, cam: str, store: str | None = None) -> Backend:
    """Classify images and series with the model file in this process."""
    from app.core.errors import ServiceError
    from app.engine.series import predict_dicom_series_sync, predict_volume_sync
    from app.settings import Settings
    from app.transports.cli.store import open_store, record

    engine = open_engine(model_path, "or use --url to ask a running service")
    records = open_store(store)

    def classify(path: Path) -> Prediction:
        data = path.read_bytes()
        try:
            started = time.perf_counter()
            prepared = engine.prepare(data, media_type_of(data, path), cam)
            result = engine.predict_prepared(prepared, cam, started=started)
        except ServiceError as exc:
            raise FileFailed(f"{exc.title}: {exc.detail}") from None
        record(records, "cli", engine, result, prepared.facts)
        return result

    limits = Settings().series_limits()

    def classify_series(path: Path) -> SeriesResult:
        try:
            if path.is_dir():
                instances = [f.read_bytes() for f in dicom_files(path)]
                return predict_dicom_series_sync(engine, instances, limits, "none")
            return predict_volume_sync(engine, path.read_bytes(), limits, "none")
        except ServiceError as exc:
            raise FileFailed(f"{exc.title}: {exc.detail}") from None

    return Backend(classify, classify_series, asdict(engine.model_identity),
                   records.close if records is not None else lambda: None)


def problem_reason(response: Any) -> str:
    """A problem+json response (or any error response) as one line."""
    try:
        body = response.json()
        text = f"{body.get('title') or response.reason_phrase}: {body.get('detail') or ''}".rstrip(": ")
    except (ValueError, AttributeError):
        text = response.reason_phrase or "error"
    return f"{text} (HTTP {response.status_code})"


def remote_classifier(
    url: str, cam: str, timeout: float, api_key: str | None = None
) -> tuple[Classify, dict[str, Any], Callable[[], None]]:
    """Classify through a running service (with ``api_key`` as X-API-Key when given). Returns the
    function, the model's identity and a closer."""
    backend = remote_backend(url, cam, timeout, api_key)
    return backend.classify, backend.model, backend.close


def remote_backend(url: str, cam: str, timeout: float, api_key: str | None = None) -> Backend:
    """Classify images and series through a running service."""
    import httpx

    headers = {"Accept": "application/json", **({"X-API-Key": api_key} if api_key else {})}
    client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)
    try:
        response = client.get("/v1/model")
    except httpx.HTTPError as exc:
        client.close()
        raise Unusable(f"cannot reach the service at {url}: {exc}") from None
    if response.status_code in (401, 403):
        client.close()
        advice = ("the service needs an API key: pass --api-key or set BTD_API_KEY" if not api_key
                  else "the API key was refused")
        raise Unusable(f"{advice} ({problem_reason(response)})")
    if response.status_code != 200:
        client.close()
        raise Unusable(f"the service at {url} is not ready: {problem_reason(response)}")
    model = response.json()

    def post(route: str, body: bytes, content_type: str, params: dict[str, str] | None = None) -> Any:
        """POST ``body`` to the service; FileFailed on a transport error or any answer but 200."""
        try:
            response = client.post(route, params=params, content=body, headers={"Content-Type": content_type})
        except httpx.HTTPError as exc:
            raise FileFailed(f"request failed: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise FileFailed(problem_reason(response))
        return response

    def classify(path: Path) -> Prediction:
        data = path.read_bytes()
        response = post("/v1/predict", data, media_type_of(data, path) or "application/octet-stream", {"cam": cam})
        try:
            return Prediction.from_dict(response.json())
        except ValueError as exc:  # not JSON, or not the shape of a prediction
            raise FileFailed(f"the service's answer is not a prediction: {exc}") from None

    def classify_series(path: Path) -> SeriesResult:
        from app.transports.pacs.multipart import encode_related

        if path.is_dir():
            body, content_type = encode_related([f.read_bytes() for f in dicom_files(path)])
        else:
            body, content_type = path.read_bytes(), "application/octet-stream"
        response = post("/v1/predict/series", body, content_type)
        try:
            return SeriesResult.from_dict(response.json())
        except ValueError as exc:
            raise FileFailed(f"the service's answer is not a series result: {exc}") from None

    identity = {k: model.get(k) for k in ("name", "version", "sha256")}
    return Backend(classify, classify_series, identity, client.close)


# ---------------------------------------------------------------- running and writing


class CamWriter:
    """Writes CAM overlay PNGs into one folder, each input under a unique, readable name
    (``slice.cam.png``, then ``slice-2.cam.png`` for another ``slice.*``), fixed in input order."""

    def __init__(self, folder: Path, files: Sequence[Path]) -> None:
        self.folder = folder
        self.names: dict[Path, str] = {}
        used: set[str] = set()
        for path in files:
            stem = path.stem or "image"
            name, n = f"{stem}.cam.png", 1
            while name in used:
                n += 1
                name = f"{stem}-{n}.cam.png"
            used.add(name)
            self.names[path] = name

    def write(self, path: Path, cam: CamPng) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / self.names[path]
        target.write_bytes(base64.b64decode(cam.overlay_png))
        return str(target)


class DicomWriter:
    """Writes each DICOM input's result objects (``<name>.sr.dcm``, ``<name>.cam.dcm``: the SR and the CAM
    overlay, referencing the input) into one folder, named as :class:`CamWriter` names its PNGs."""

    def __init__(self, folder: Path, files: Sequence[Path]) -> None:
        self.folder = folder
        self.stems = {path: name.removesuffix(".cam.png") for path, name in CamWriter(folder, files).names.items()}

    def write(self, path: Path, result: Prediction) -> list[str]:
        from app.transports.pacs.results import build_results, encode, read_source

        data = path.read_bytes()
        if sniff(data[:SIGNATURE_BYTES]) != DICOM:
            return []  # DICOM results copy and reference a DICOM source
        datasets = build_results(read_source(data), result)  # InvalidImage: the caller's
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        for ds, suffix in zip(datasets, (".sr.dcm", ".cam.dcm")):
            target = self.folder / f"{self.stems[path]}{suffix}"
            target.write_bytes(encode(ds))
            written.append(str(target))
        return written


def without_images(result: Prediction) -> Prediction:
    """The result without its (large) base64 PNGs, so thousands of results fit in memory."""
    if not isinstance(result.cam, CamPng):
        return result
    return replace(result, cam=replace(result.cam, image_png="", heatmap_png="", overlay_png=""))


def result_record(result: Prediction | None) -> dict[str, Any] | None:
    """The response as JSON (without the base64 images)."""
    if result is None:
        return None
    record = result.to_dict()
    if record["cam"]:
        record["cam"] = {k: v for k, v in record["cam"].items() if not k.endswith("_png")}
    return record


def classify_all(files: Sequence[Path], classify: Classify, *, jobs: int, progress: bool,
                 cams: CamWriter | None = None, dicoms: DicomWriter | None = None) -> list[Outcome]:
    """Classify every file (in parallel threads when jobs > 1), writing CAM overlays (and DICOM results)
    as results arrive; outcomes in input order."""
    from tqdm import tqdm

    from app.core.errors import ServiceError

    def one(path: Path) -> Outcome:
        try:
            result = classify(path)
            cam_file = cams.write(path, result.cam) if cams and isinstance(result.cam, CamPng) else None
            dicom_files = dicoms.write(path, result) if dicoms else None
        except FileFailed as exc:
            return Outcome(str(path), error=str(exc))
        except ServiceError as exc:
            return Outcome(str(path), error=f"{exc.title}: {exc.detail}")
        except OSError as exc:
            return Outcome(str(path), error=f"cannot read or write a file: {exc.strerror or exc}")
        return Outcome(str(path), result=without_images(result), cam_file=cam_file, dicom_files=dicom_files)

    bar = tqdm(total=len(files), unit="image", file=sys.stderr, disable=not progress, desc="btd predict")
    with bar:
        if jobs <= 1:
            outcomes = []
            for path in files:
                outcomes.append(one(path))
                bar.update(1)
            return outcomes
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, path) for path in files]
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            return [f.result() for f in futures]


def summary_fields(outcome: Outcome) -> dict[str, Any]:
    """The flat fields shared by the table and CSV outputs."""
    r = outcome.result
    detected = r.tumour_detected if r else None
    return {
        "file": outcome.path,
        "ok": outcome.ok,
        "label": r.label if r else "",
        "probability": r.confidence if r else None,
        "tumour_probability": r.tumour_probability if r else None,
        "tumour_detected": "" if detected is None else ("yes" if detected else "no"),
        "in_distribution": "" if r is None or r.in_distribution is None else ("yes" if r.in_distribution else "no"),
        "ood_score": r.ood_score if r else None,
        "total_ms": r.timings_ms.total if r else None,
        "cam_file": outcome.cam_file or "",
        "region_box": region_box(r) if r else "",
        "error": outcome.error or "",
        "warning": ood_note(r) if r else "",
    }


def region_box(result: Prediction) -> str:
    """The tumour region's box as ``x,y WxH`` (decoded image pixels), or "" without a region."""
    box = result.region.box if result.region is not None else None
    return "" if box is None else f"{box.x},{box.y} {box.width}x{box.height}"


def ood_note(result: Prediction) -> str:
    """The warnings that say why the image is not assessed, when it is not (shown instead of a finding):
    outside the validated use (plane, sequence) and / or out of distribution."""
    if result.in_distribution is not False:
        return ""
    return "; ".join(w for w in result.warnings if w.startswith(NOT_ASSESSED_PHRASES)) or OOD_PHRASE


def fmt_number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def finding_line(result: SeriesResult) -> str:
    """The series finding in one line."""
    f = result.finding
    counts = f"{f.slices_assessed} of {f.slices_assessed + f.slices_not_assessed} slices assessed"
    if f.not_assessed_reasons:
        counts += " (not assessed: " + ", ".join(f"{r} {n}" for r, n in f.not_assessed_reasons.items()) + ")"
    if not f.assessed:
        return f"NOT ASSESSED: no slice of the series was assessed; {counts}"
    if f.tumour_detected is None:
        return f"label {f.label} (the model makes no tumour finding); {counts}"
    verdict = f"TUMOUR suspected ({f.label})" if f.tumour_detected else "no tumour"
    keys = f"; key slices {', '.join(map(str, f.key_slices))}" if f.key_slices else ""
    return (f"{verdict}: series tumour probability {f.tumour_probability:.3f} (threshold {f.threshold:.3f})"
            f"{keys}; {counts}")


def write_series_table(outcome: Outcome, out: TextIO) -> None:
    """One series: its slices in order, then its finding."""
    result = outcome.series
    assert result is not None
    out.write(f"\nSERIES {outcome.path} ({result.source}, {len(result.slices)} slices, ordered by "
              f"{result.ordering})\n")
    rows = []
    for item in result.slices:
        where = "" if item.position is None else f"{item.position:g}"
        frame = "" if item.frame_number is None else f"#{item.frame_number}"
        rows.append(Outcome(f"{item.index:>4} {where:>8} {frame}".rstrip(), result=item.result))
    write_table(rows, out, first="SLICE POSITION", short_notes=True)
    out.write(f"FINDING {finding_line(result)}\n")


def write_table(outcomes: Sequence[Outcome], out: TextIO, first: str = "FILE", short_notes: bool = False) -> None:
    """The table; ``short_notes``: a not-assessed row names its reasons, not the whole warning (a
    series' slices: the warnings are in --format json)."""
    series = [o for o in outcomes if o.series is not None]
    outcomes = [o for o in outcomes if o.series is None]
    header = [first, "LABEL", "P", "TUMOUR P", "TUMOUR", "MS", "NOTE"]
    rows = []
    for o in outcomes:
        s = summary_fields(o)
        if not o.ok:
            rows.append([s["file"], "FAILED", "", "", "", "", s["error"]])
        elif s["warning"]:  # out of distribution: the warning instead of a finding
            note = f"not assessed: {', '.join(o.result.ood_reasons)}" if short_notes and o.result else s["warning"]
            rows.append([s["file"], "NOT ASSESSED", "-", "-", "-", fmt_number(s["total_ms"], 1),
                         " ".join(filter(None, [note, s["cam_file"]]))])
        else:
            rows.append([s["file"], s["label"], fmt_number(s["probability"]), fmt_number(s["tumour_probability"]),
                         s["tumour_detected"], fmt_number(s["total_ms"], 1),
                         " ".join(filter(None, [s["region_box"] and f"region {s['region_box']}", s["cam_file"]]))])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows] if rows else []:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=False)] + [str(row[-1])]
        out.write("  ".join(cells).rstrip() + "\n")
    for o in series:
        write_series_table(o, out)


def write_csv(outcomes: Sequence[Outcome], out: TextIO, labels: Sequence[str]) -> None:
    columns = ["file", "ok", "label", "probability", *[f"p_{label}" for label in labels],
               "tumour_probability", "tumour_detected", "in_distribution", "ood_score", "total_ms", "cam_file",
               "region_box", "error", "warning"]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for o in outcomes:
        row = summary_fields(o)
        probs = o.result.probabilities if o.result else {}
        row.update({f"p_{label}": probs.get(label, "") for label in labels})
        writer.writerow({k: "" if v is None else v for k, v in row.items()})


def series_record(outcome: Outcome) -> dict[str, Any]:
    return {"file": outcome.path, "ok": outcome.ok,
            "series": outcome.series.to_dict() if outcome.series else None, "error": outcome.error}


def json_record(outcome: Outcome) -> dict[str, Any]:
    """The response (without base64 images) and where the CAM overlay was written."""
    if outcome.series is not None:
        return series_record(outcome)
    return {"file": outcome.path, "ok": outcome.ok, "result": result_record(outcome.result), "cam_file": outcome.cam_file,
            "dicom_files": outcome.dicom_files, "error": outcome.error}


def write_output(outcomes: Sequence[Outcome], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump([json_record(o) for o in outcomes], out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        labels: list[str] = []
        for o in outcomes:
            labels += [label for label in (o.result.probabilities if o.result else {}) if label not in labels]
        write_csv(outcomes, out, labels)
    else:
        write_table(outcomes, out)


def split_inputs(args: argparse.Namespace) -> tuple[list[Path], list[Path], list[Outcome]]:
    """(image files, series inputs: folders with ``--series`` and NIfTI files, failures)."""
    if args.series:
        folders = [Path(a) for a in args.paths if Path(a).is_dir()]
        missing = [Outcome(a, error="--series needs a folder of DICOM instances") for a in args.paths
                   if not Path(a).is_dir()]
        missing += [Outcome(str(f), error="no DICOM file in this folder") for f in folders if not dicom_files(f)]
        return [], [f for f in folders if dicom_files(f)], missing
    files, missing = collect_inputs(args.paths)
    volumes = [f for f in files if is_nifti(f)]
    return [f for f in files if f not in volumes], volumes, missing


def classify_series_all(inputs: Sequence[Path], classify_series: ClassifySeries) -> list[Outcome]:
    outcomes = []
    for path in inputs:
        try:
            outcomes.append(Outcome(str(path), series=classify_series(path)))
        except FileFailed as exc:
            outcomes.append(Outcome(str(path), error=str(exc)))
        except OSError as exc:
            outcomes.append(Outcome(str(path), error=f"cannot read a file: {exc.strerror or exc}"))
    return outcomes


def predict_files(args: argparse.Namespace) -> list[Outcome]:
    """Run the whole command except output; raises Unusable when nothing can be done."""
    files, series, missing = split_inputs(args)
    if not files and not series and not missing:
        raise Unusable("no image files found in the given paths")
    if series and args.format == "csv":
        raise Unusable("a series prints as a table or JSON (--format table or json), not CSV")
    if series and (args.cam_dir or args.dicom_dir):
        raise Unusable("--cam-dir and --dicom-dir are for single images, not series")
    cam = "png" if args.cam_dir or args.dicom_dir else "none"
    if args.url and args.store is not None:
        raise Unusable("--store records answers made here; with --url the service records its own")
    if args.url:
        backend = remote_backend(args.url, cam, args.timeout, args.api_key)
        jobs, where = args.jobs, args.url
    else:
        backend = local_backend(model_path_of(args), cam, args.store)
        jobs, where = 1, "this machine"  # one ONNX Runtime session already uses the cores
    if not args.no_progress:
        about = f"model {backend.model['name']} {backend.model['version']} on {where}"
        counted = f"{len(files)} files" + (f", {len(series)} series" if series else "")
        print(f"btd predict: {counted}, {about}", file=sys.stderr)
    cams = CamWriter(Path(args.cam_dir), files) if args.cam_dir else None
    dicoms = DicomWriter(Path(args.dicom_dir), files) if args.dicom_dir else None
    try:
        outcomes = classify_all(files, backend.classify, jobs=jobs, progress=not args.no_progress, cams=cams,
                                dicoms=dicoms) if files else []
        outcomes += classify_series_all(series, backend.classify_series)
    finally:
        backend.close()
    return missing + outcomes


def run_predict(args: argparse.Namespace) -> int:
    try:
        outcomes = predict_files(args)
    except Unusable as exc:
        print(f"btd predict: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as out:
            write_output(outcomes, args.format, out)
    else:
        try:
            write_output(outcomes, args.format, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. `btd predict ... | head`: the reader has what it wanted
            silence_stdout()
            return EXIT_OUTPUT_CLOSED
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines = "".join(f"\n  {o.path}: {o.error}" for o in failed)
        print(f"btd predict: {len(failed)} of {len(outcomes)} files failed:{lines}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe raises nothing
    (what the Python docs advise for SIGPIPE; restoring SIGPIPE's default would also kill the
    process on a closed socket)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``predict`` on an argparse subparsers object; the command runs ``args.run(args)``."""
    parser = subparsers.add_parser(
        "predict",
        help="classify image files with the local model or a running service",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", metavar="FILE",
                       help="ONNX model file (default: $BTD_MODEL_PATH or the shipped model)")
    where.add_argument("--url", metavar="URL", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    add("--format", choices=FORMATS, default="table", help="output format (default: table)")
    add("-o", "--output", metavar="FILE", help="write the output to FILE instead of stdout")
    add("--cam-dir", metavar="DIR", help="write each image's CAM overlay as DIR/<name>.cam.png")
    add("--dicom-dir", metavar="DIR", help="for each DICOM input, write its DICOM results: DIR/<name>.sr.dcm "
        "(Comprehensive SR) and DIR/<name>.cam.dcm (CAM overlay, Secondary Capture), referencing the input")
    add("--jobs", type=int_at_least(1), default=4, help="parallel requests in --url mode (default: 4)")
    add("--timeout", type=float, default=60.0, help="seconds per request in --url mode (default: 60)")
    add("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
        help=f"API key for a service that asks for one, sent as X-API-Key (default: ${API_KEY_ENV}; the "
             "variable keeps the key out of the process list)")
    add("--series", action="store_true", help="each PATH is a folder holding one series of DICOM instances: print "
        "its slices in order and the series finding (NIfTI files, .nii / .nii.gz, are series without it)")
    add("--no-progress", action="store_true", help="no progress bar on stderr")
    from app.transports.cli.store import add_store_argument

    add_store_argument(parser)
    parser.set_defaults(run=run_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.transports.cli.predict PATH...``: the same command without the ``btd`` dispatcher."""
    parser = argparse.ArgumentParser(prog="btd")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["predict", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
