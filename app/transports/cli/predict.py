"""``btd predict``: classify image files with the local model or a running service.

    btd predict scans/ extra.dcm 'more/**/*.png'                # the shipped model, on this machine
    btd predict --url http://127.0.0.1:8000 scans/ --format csv  # a running service
    btd predict scans/ --cam-dir cams/                           # also write CAM overlays as PNG

PATHs are files, folders (searched recursively) or glob patterns. In folders, files count as
images by extension (.png .jpg .jpeg .dcm .dicom) or by signature (DICOM often has no extension);
a file named explicitly is always sent. A service with API keys needs ``--api-key`` or
``BTD_API_KEY``. Exit status: 0 all files classified, 1 some file failed (each with its reason in
the output), 2 nothing could be done (no model, no service, no input, no valid API key), 141 the
reader closed the output early (``| head``), as for any Unix tool killed by SIGPIPE.

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
from typing import Any, TextIO

from app.core.decode import DICOM, media_type_for_path, sniff
from app.core.formats import SIGNATURE_BYTES
from app.core.result import NOT_ASSESSED_PHRASES, OOD_PHRASE, CamPng, Prediction

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

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------- finding the files


def looks_like_image(path: Path) -> bool:
    if media_type_for_path(path):
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


class FileFailed(Exception):
    """One file could not be classified; the message is the reason shown to the user."""


def local_classifier(model_path: Path, cam: str,
                     store: str | None = None) -> tuple[Classify, dict[str, Any], Callable[[], None]]:
    """Classify with the model file in this process. Returns the function, the model's identity and
    a closer (which writes the records, with ``store``: ``--store``)."""
    if not model_path.is_file():
        raise Unusable(
            f"model file not found: {model_path}. Export one (btd export), pass --model FILE, "
            "or use --url to ask a running service."
        )
    from app.core.errors import ServiceError
    from app.engine.engine import Engine
    from app.settings import Settings

    try:
        engine = Engine.load_single(model_path, Settings().engine_options())
    except (ValueError, OSError) as exc:
        raise Unusable(f"cannot load the model {model_path}: {exc}") from None

    from app.transports.cli.store import open_store, record

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

    return classify, asdict(engine.model_identity), records.close if records is not None else lambda: None


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

    def classify(path: Path) -> Prediction:
        data = path.read_bytes()
        headers = {"Content-Type": media_type_of(data, path) or "application/octet-stream"}
        try:
            response = client.post("/v1/predict", params={"cam": cam}, content=data, headers=headers)
        except httpx.HTTPError as exc:
            raise FileFailed(f"request failed: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise FileFailed(problem_reason(response))
        try:
            return Prediction.from_dict(response.json())
        except ValueError as exc:  # not JSON, or not the shape of a prediction
            raise FileFailed(f"the service's answer is not a prediction: {exc}") from None

    identity = {k: model.get(k) for k in ("name", "version", "sha256")}
    return classify, identity, client.close


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


def write_table(outcomes: Sequence[Outcome], out: TextIO) -> None:
    header = ["FILE", "LABEL", "P", "TUMOUR P", "TUMOUR", "MS", "NOTE"]
    rows = []
    for o in outcomes:
        s = summary_fields(o)
        if not o.ok:
            rows.append([s["file"], "FAILED", "", "", "", "", s["error"]])
        elif s["warning"]:  # out of distribution: the warning instead of a finding
            rows.append([s["file"], "NOT ASSESSED", "-", "-", "-", fmt_number(s["total_ms"], 1),
                         " ".join(filter(None, [s["warning"], s["cam_file"]]))])
        else:
            rows.append([s["file"], s["label"], fmt_number(s["probability"]), fmt_number(s["tumour_probability"]),
                         s["tumour_detected"], fmt_number(s["total_ms"], 1),
                         " ".join(filter(None, [s["region_box"] and f"region {s['region_box']}", s["cam_file"]]))])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=False)] + [str(row[-1])]
        out.write("  ".join(cells).rstrip() + "\n")


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


def json_record(outcome: Outcome) -> dict[str, Any]:
    """The response (without base64 images) and where the CAM overlay was written."""
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


def predict_files(args: argparse.Namespace) -> list[Outcome]:
    """Run the whole command except output; raises Unusable when nothing can be done."""
    files, missing = collect_inputs(args.paths)
    if not files and not missing:
        raise Unusable("no image files found in the given paths")
    cam = "png" if args.cam_dir or args.dicom_dir else "none"
    if args.url and args.store is not None:
        raise Unusable("--store records answers made here; with --url the service records its own")
    if args.url:
        classify, model, close = remote_classifier(args.url, cam, args.timeout, args.api_key)
        jobs, where = args.jobs, args.url
    else:
        from app.settings import InvalidSettings, load_settings

        try:
            model_path = Path(args.model) if args.model else load_settings().model_path
        except InvalidSettings as exc:
            raise Unusable(f"invalid settings:\n{textwrap.indent(str(exc), '  ')}") from None
        classify, model, close = local_classifier(model_path, cam, args.store)
        jobs, where = 1, "this machine"  # one ONNX Runtime session already uses the cores
    if not args.no_progress:
        about = f"model {model['name']} {model['version']} on {where}"
        print(f"btd predict: {len(files)} files, {about}", file=sys.stderr)
    cams = CamWriter(Path(args.cam_dir), files) if args.cam_dir else None
    dicoms = DicomWriter(Path(args.dicom_dir), files) if args.dicom_dir else None
    try:
        outcomes = classify_all(files, classify, jobs=jobs, progress=not args.no_progress, cams=cams, dicoms=dicoms)
    finally:
        close()
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


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
    add("--jobs", type=positive_int, default=4, help="parallel requests in --url mode (default: 4)")
    add("--timeout", type=float, default=60.0, help="seconds per request in --url mode (default: 60)")
    add("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
        help=f"API key for a service that asks for one, sent as X-API-Key (default: ${API_KEY_ENV}; the "
             "variable keeps the key out of the process list)")
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
