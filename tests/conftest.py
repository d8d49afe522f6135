"""Settings for every test directory.

Starlette 1.x warns, when its test client is first imported, that it wants the ``httpx2`` package
instead of ``httpx``; the client works the same with either, and the service itself never imports
it. The client is imported here first, with only that message ignored, so no later import (the API
tests' conftest and helpers) prints it. pyproject's pytest settings cannot do it: the first import
happens while conftest files load, before ini ``filterwarnings`` apply.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated",
                            category=UserWarning)
    import fastapi.testclient  # noqa: F401
