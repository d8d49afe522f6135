"""The committed OpenAPI document, ``openapi/openapi.json``, and how to regenerate it.

    .venv/bin/python -m app.transports.http.spec            # rewrite openapi/openapi.json from the app
    .venv/bin/python -m app.transports.http.spec --check    # exit 1 if the committed file differs

tests/api/test_api_openapi.py fails when the app's generated spec differs from the committed file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.settings import REPO_ROOT, Settings

SPEC_PATH = REPO_ROOT / "openapi" / "openapi.json"


def generate() -> dict:
    """The app's OpenAPI document (independent of the environment: default settings, no model loaded)."""
    from app.transports.http.main import create_app

    return create_app(Settings(_env_file=None)).openapi()


def render(spec: dict) -> str:
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed file")
    parser.add_argument("--path", type=Path, default=SPEC_PATH)
    args = parser.parse_args(argv)
    text = render(generate())
    if args.check:
        current = args.path.read_text() if args.path.is_file() else ""
        if current != text:
            print(f"{args.path} is out of date: run python -m app.transports.http.spec", file=sys.stderr)
            return 1
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
