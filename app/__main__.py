"""``python -m app``: serve the model with uvicorn (one worker), configured by ``BTD_*`` variables.

SIGTERM / SIGINT drain: ``/readyz`` turns 503 at once, the listening socket closes, in-flight
requests finish (up to ``BTD_DRAIN_TIMEOUT_S``), then the process exits (status 0 after SIGTERM).
Exit status 2 means the settings or the model file are wrong (the message says what to do), 1 that
the model failed to load.
"""

from __future__ import annotations

import logging
import signal
import sys
import textwrap

import uvicorn

from app.engine import metrics
from app.engine.malloc import return_freed_memory
from app.settings import InvalidSettings, load_settings
from app.transports.http.api_keys import KeyFileError
from app.transports.http.main import create_app
from app.transports.http.server import server_config

log = logging.getLogger("app")

MISSING_MODEL_HELP = """\
error: no model file at {path}
The service needs an ONNX model that follows the model contract. Either:
  - restore the shipped model, which the repository holds (README, "The shipped model"):
      git checkout -- models/btd-resnet50.onnx
  - rebuild it from the data (needs the train extra and ../shared/data):
      .venv/bin/python models/release.py --data ../shared/data
  - train and export your own with `.venv/bin/btd train ...` then `.venv/bin/btd export ...`
    (README, "Training on your own data"), or
  - point BTD_MODEL_PATH at an existing model file, e.g. BTD_MODEL_PATH=/path/to/model.onnx bash scripts/serve.sh
  - to try the API only, make an untrained demo model (random weights, meaningless answers):
      .venv/bin/python -m tests.model_factory /tmp/btd-demo.onnx
      BTD_MODEL_PATH=/tmp/btd-demo.onnx bash scripts/serve.sh
"""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining (``/readyz`` 503) as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.fatal = False

    def handle_exit(self, sig: int, frame) -> None:
        if not self.runtime.draining:
            log.info("signal %d: draining (readyz 503), finishing in-flight requests", sig)
        self.runtime.draining = True
        metrics.READY.set(0)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:  # a drained SIGTERM is the normal way to stop: exit 0, not "killed by 15"
            captured = getattr(self, "_captured_signals", [])
            while signal.SIGTERM in captured:
                captured.remove(signal.SIGTERM)

    def stop_fatal(self) -> None:
        self.fatal = True
        self.should_exit = True


def main() -> int:
    return_freed_memory()  # before any image is decoded: memory goes back after a burst (app/engine/malloc.py)
    try:
        settings = load_settings()
    except InvalidSettings as exc:
        reasons = textwrap.indent(str(exc), "  ")
        print(f'error: invalid settings (see the README, "Configuration"):\n{reasons}', file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.model_path.exists():
        print(MISSING_MODEL_HELP.format(path=settings.model_path), file=sys.stderr)
        return 2
    server: DrainingServer | None = None

    def on_fatal() -> None:
        if server is not None:
            server.stop_fatal()

    for name, path in (("BTD_TLS_CERTFILE", settings.tls_certfile), ("BTD_TLS_KEYFILE", settings.tls_keyfile)):
        if path is not None and not path.is_file():
            print(f"error: {name}: no file at {path}", file=sys.stderr)
            return 2
    try:
        app = create_app(settings, on_fatal=on_fatal)
    except KeyFileError as exc:  # fail closed: never serve without the keys that were asked for
        print(f"error: API keys: {exc}", file=sys.stderr)
        return 2
    server = DrainingServer(server_config(app, settings), app.state.runtime)
    server.run()
    return 1 if server.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
