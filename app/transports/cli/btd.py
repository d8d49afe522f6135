"""``btd``: one command line for the service side and the training pipeline.

    btd predict ...            (app.transports.cli.predict)
    btd validate ...           (app.transports.cli.validate: a site's acceptance test)
    btd dicom-listen / dicomweb  (app.transports.cli.pacs)
    btd train / evaluate / average / fit-ood / export / quantize   (model_export.cli)

The service's commands are registered here. The training commands are registered by
``model_export.cli`` (it imports neither torch nor FastAPI until a command runs), so ``btd --help``
and ``btd predict`` work on a service-only install and training stays a layer of its own: this is
the one place the service package reaches into training, and only to build the parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from app.transports.cli.pacs import add_pacs_parsers
from app.transports.cli.predict import add_predict_parser
from app.transports.cli.validate import add_validate_parser

# The commands' own loggers say what they do at INFO; everything else (httpx logs every request at
# INFO, the service's modules log for a server's operators) speaks only at WARNING unless -v.
OWN_LOGGERS = ("btd", "model_export")


def build_parser() -> argparse.ArgumentParser:
    from model_export import cli as training  # argparse only: no torch until a command runs

    parser = argparse.ArgumentParser(prog="btd", description="Brain-MRI tumour classification: train, "
                                     "evaluate, export and quantize a ResNet-50, and run predictions.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training.add_training_parsers(sub)
    add_predict_parser(sub)
    add_validate_parser(sub)
    add_pacs_parsers(sub)
    return parser


def setup_logging(verbose: bool, own_level: int | None = None) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_level if own_level is not None else
                                         logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "run_training"):  # a training command: its runner maps the pipeline's errors
        from model_export import cli as training

        setup_logging(args.verbose, training.own_log_level(args.verbose))
        return training.run(args)
    setup_logging(args.verbose)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
