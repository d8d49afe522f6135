"""Settings for every test directory.

Starlette 1.x warns, when its test client is first imported, that it wants the ``httpx2`` package
instead of ``httpx``; the client works the same with either, and the service itself never imports
it. The client is imported here first, with only that message ignored, so no later import (the API
tests' conftest and helpers) prints it. pyproject's pytest settings cannot do it: the first import
happens while conftest files load, before ini ``filterwarnings`` apply.

The prediction records of every app and server the tests start (BTD_RECORDS is on by default) go to
one temporary data directory, not the repository's ``data/``; tests of the records set their own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

if "BTD_RECORDS_DIR" not in os.environ and "BTD_DATABASE_URL" not in os.environ:
    os.environ["BTD_RECORDS_DIR"] = tempfile.mkdtemp(prefix="btd-test-data-")
    atexit.register(shutil.rmtree, os.environ["BTD_RECORDS_DIR"], True)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated",
                            category=UserWarning)
    import fastapi.testclient  # noqa: F401
