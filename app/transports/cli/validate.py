"""``btd validate``: a site's acceptance test of the model on its own labelled images.

    btd validate scans/ --labels labels.csv                  # writes validation-report.html and .json
    btd validate scans/ --labels labels.csv --out site.html --model models/btd-resnet50.onnx

DIR holds the images (PNG, JPEG, DICOM; searched recursively, hidden files skipped). LABELS is a CSV
file with a header row and the columns ``file`` (the image's path relative to DIR, with ``/``) and
``label`` (one of the model's labels, e.g. glioma, meningioma, notumor, pituitary); other columns
are ignored. Every row must name an image under DIR, once; every image under DIR must have a row
(or pass --ignore-unlabelled). The model runs on this machine as the service runs it (the same
decode, preprocessing, decision and intended-use gate; BTD_MODEL_VARIANT, threads and threshold from
the BTD_* settings). Writes one self-contained HTML report (no external assets) and a JSON file of
its figures beside it; neither holds file names or any DICOM value but the subgroup names.
Exit status: 0 report written, 1 written but some files could not be read (listed on stderr),
2 nothing written (bad labels file, no model, no images).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from app.transports.cli.predict import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_UNUSABLE,
    Unusable,
    collect_inputs,
    int_at_least,
    media_type_of,
    model_path_of,
    open_engine,
)

if TYPE_CHECKING:
    from app.engine.engine import Engine
    from app.transports.cli.validation_report import Measured

LABEL_COLUMNS = ("file", "label")
DEFAULT_OUT = "validation-report.html"
SHOWN_PROBLEMS = 5  # a labels file's problems listed in the error, then a count


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    label: str


def _listed(problems: Sequence[str]) -> str:
    more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return "".join(f"\n  {p}" for p in problems[:SHOWN_PROBLEMS]) + more


def read_labels(folder: Path, labels_csv: Path, model_labels: Sequence[str], *,
                ignore_unlabelled: bool = False) -> list[LabelledFile]:
    """The labelled images, in the labels file's order. Unusable, naming the lines, for a file without
    the columns, a label the model does not know, a row naming no image under ``folder`` or one named
    twice, and (unless ``ignore_unlabelled``) images under ``folder`` without a row."""
    if not folder.is_dir():
        raise Unusable(f"no such folder: {folder}")
    try:
        with open(labels_csv, newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's BOM
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in LABEL_COLUMNS if c not in columns]
            if missing:
                raise Unusable(f"{labels_csv}: the header row must name the columns {', '.join(LABEL_COLUMNS)} "
                               f"(missing: {', '.join(missing)}; found: {', '.join(columns) or 'nothing'})")
            reader.fieldnames = columns
            rows = [(reader.line_num, row) for row in reader]
    except OSError as exc:
        raise Unusable(f"cannot read the labels file {labels_csv}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise Unusable(f"{labels_csv} is not a UTF-8 CSV file: {exc}") from None
    if not rows:
        raise Unusable(f"{labels_csv} has no rows below its header")
    problems: list[str] = []
    labelled: list[LabelledFile] = []
    seen: dict[PurePosixPath, int] = {}
    for line, row in rows:
        name, label = (row.get("file") or "").strip(), (row.get("label") or "").strip()
        relative = PurePosixPath(name.replace("\\", "/"))  # PurePosixPath drops "." parts and doubled "/"
        if label not in model_labels:
            problems.append(f"line {line}: label {label!r} is not one of the model's labels ({', '.join(model_labels)})")
        if not name or relative.is_absolute() or ".." in relative.parts:
            problems.append(f"line {line}: file {name!r} is not a path relative to {folder} (without '..')")
        elif not (folder / relative).is_file():
            problems.append(f"line {line}: no file {name!r} under {folder}")
        elif relative in seen:
            problems.append(f"line {line}: file {name!r} is already labelled on line {seen[relative]}")
        else:
            seen[relative] = line
            labelled.append(LabelledFile(folder / relative, label))
    if problems:
        raise Unusable(f"{labels_csv}: {len(problems)} problem(s):{_listed(problems)}")
    if not ignore_unlabelled:
        images, _ = collect_inputs([str(folder)])
        unlabelled = [p.relative_to(folder).as_posix() for p in images
                      if PurePosixPath(p.relative_to(folder).as_posix()) not in seen]
        if unlabelled:
            raise Unusable(f"{len(unlabelled)} image(s) under {folder} have no row in {labels_csv} (add them, or "
                           f"pass --ignore-unlabelled to measure only the labelled ones):{_listed(unlabelled)}")
    return labelled


def measure(files: Sequence[LabelledFile], engine: Engine, *, progress: bool) -> list[Measured]:
    """Each file through the engine, as ``btd predict`` runs it (no CAM); a file that fails keeps its
    error's title (never its path: the report holds no file names)."""
    from tqdm import tqdm

    from app.core.decode import DICOM
    from app.core.errors import ServiceError
    from app.core.scanner import Scanner, read_scanner
    from app.transports.cli.validation_report import Measured, subgroups_of

    out: list[Measured] = []
    for item in tqdm(files, unit="image", file=sys.stderr, disable=not progress, desc="btd validate"):
        try:
            data = item.path.read_bytes()
            media_type = media_type_of(data, item.path)
            started = time.perf_counter()
            prediction, output = engine.predict_prepared_output(engine.prepare(data, media_type), started=started)
        except ServiceError as exc:
            out.append(Measured(item.label, error=exc.title, detail=f"{item.path}: {exc.title}: {exc.detail}"))
            continue
        except OSError as exc:
            out.append(Measured(item.label, error="unreadable file", detail=f"{item.path}: {exc.strerror or exc}"))
            continue
        scanner = read_scanner(data, engine.options.max_pixels) if media_type == DICOM else Scanner()
        out.append(Measured(item.label, output.logits, prediction, subgroups_of(prediction, scanner)))
    return out


def run_validate(args: argparse.Namespace) -> int:
    try:
        missing = [name for name in ("jinja2", "matplotlib", "scipy", "sklearn") if not _importable(name)]
        if missing:
            raise Unusable(f"needs the report extra ({', '.join(missing)} missing): "
                           "pip install -e '.[cpu,report]' (scripts/test.sh installs it)")
        from app.transports.cli.validation_report import build_figures, write_report

        engine = open_engine(model_path_of(args))
        labels = list(engine.metadata.labels)
        files = read_labels(Path(args.folder), Path(args.labels), labels, ignore_unlabelled=args.ignore_unlabelled)
        if not args.no_progress:
            model = engine.model_identity
            print(f"btd validate: {len(files)} labelled images, model {model.name} {model.version} "
                  f"({engine.variant})", file=sys.stderr)
        measured = measure(files, engine, progress=not args.no_progress)
        figures, data = build_figures(measured, engine, resamples=args.bootstrap, seed=args.seed)
        html_path = Path(args.out)
        json_path = html_path.with_suffix(".json")
        try:
            write_report(figures, data, html_path, json_path)
        except OSError as exc:
            raise Unusable(f"cannot write the report {html_path}: {exc.strerror or exc}") from None
    except Unusable as exc:
        print(f"btd validate: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"btd validate: wrote {html_path} and {json_path}", file=sys.stderr)
    failed = [m for m in measured if m.error]
    if failed:
        print(f"btd validate: {len(failed)} of {len(measured)} files could not be read (counted in the report):"
              f"{''.join(f'{chr(10)}  {m.detail}' for m in failed)}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def add_validate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``validate`` on an argparse subparsers object; the command runs ``args.run(args)``."""
    parser = subparsers.add_parser(
        "validate", help="measure the model on a site's labelled images: an HTML report with 95%% intervals",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("folder", metavar="DIR", help="folder of the images (searched recursively)")
    add("--labels", required=True, metavar="CSV", help="CSV with columns file (relative to DIR) and label")
    add("--out", default=DEFAULT_OUT, metavar="HTML",
        help=f"the HTML report; its figures as JSON beside it, suffix .json (default: {DEFAULT_OUT})")
    add("--model", metavar="FILE", help="ONNX model file (default: $BTD_MODEL_PATH or the shipped model)")
    add("--ignore-unlabelled", action="store_true", help="measure the labelled images only, when DIR holds others")
    add("--bootstrap", type=int_at_least(0), default=1000, metavar="N",
        help="bootstrap resamples for the intervals of macro F1 and AUC (default: 1000; 0: none)")
    add("--seed", type=int, default=0, help="the bootstrap's random seed (default: 0)")
    add("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run_validate)
    return parser
