"""API keys: stored hashed, several named keys at once (for rotation), compared in constant time.

A keys file (``BTD_API_KEYS_FILE``, e.g. a mounted Kubernetes Secret) or ``BTD_API_KEYS`` holds one
key per line, never the key itself::

    # name:sha256 of the key[:scopes]  scopes: predict (/v1/*), feedback (/v1/feedback), metrics, docs; none = all
    pacs-router:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08:predict
    prometheus:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752:metrics

Keys are random 256-bit tokens, so one SHA-256 is a safe hash (slow password hashes are for
guessable secrets). The file is re-read when it changes, so a key can be added, handed out and
the old one removed without a restart. Make a key with::

    python -m app.transports.http.api_keys new pacs-router --scopes predict
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("app.auth")

SCOPES = ("predict", "feedback", "metrics", "docs")
KEY_PREFIX = "btd_"  # lets secret scanners recognise a leaked key
RELOAD_CHECK_S = 5.0  # how often the keys file's size and mtime are looked at
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(ValueError):
    """The keys file or BTD_API_KEYS cannot be used; the message says which line and why (never a key)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    scopes: frozenset[str]


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_line(name: str, key: str, scopes: tuple[str, ...] = ()) -> str:
    """The keys-file line for ``key`` (its hash, not the key)."""
    line = f"{name}:{digest_of(key).hex()}"
    return f"{line}:{','.join(scopes)}" if scopes else line


def parse_keys(text: str, source: str) -> list[ApiKey]:
    keys: dict[str, ApiKey] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) not in (2, 3) or not _NAME.match(parts[0]) or not _DIGEST.match(parts[1].lower()):
            raise KeyFileError(f"{source} line {number}: expected name:sha256-hex[:scopes] "
                               "(python -m app.transports.http.api_keys new NAME makes one)")
        scopes = frozenset(s.strip() for s in parts[2].split(",") if s.strip()) if len(parts) == 3 else frozenset()
        if scopes - set(SCOPES):
            raise KeyFileError(f"{source} line {number}: unknown scope(s) {sorted(scopes - set(SCOPES))}; "
                               f"use {', '.join(SCOPES)}")
        if parts[0] in keys:
            raise KeyFileError(f"{source} line {number}: the name {parts[0]!r} is used twice")
        keys[parts[0]] = ApiKey(parts[0], bytes.fromhex(parts[1]), scopes or frozenset(SCOPES))
    return list(keys.values())


class KeyStore:
    """The keys from the file and/or the inline text; ``verify`` takes a presented key."""

    def __init__(self, path: Path | None = None, inline: str | None = None) -> None:
        self.path = path
        self.inline = inline
        self._inline_keys = parse_keys(inline, "BTD_API_KEYS") if inline else []
        self._file_keys: list[ApiKey] = []
        self._file_state: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        if path is not None:
            self._file_keys, self._file_state = self._read_file()
        if not self.keys:
            raise KeyFileError("no API keys are configured: every request would be refused")

    @property
    def keys(self) -> list[ApiKey]:
        return self._file_keys + self._inline_keys

    def _read_file(self) -> tuple[list[ApiKey], tuple[int, int, int]]:
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"cannot read the API keys file {self.path}: {exc.strerror or exc}") from None
        return parse_keys(text, str(self.path)), (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size, stat.st_ino) == self._file_state:
                return
            keys, state = self._read_file()
        except (OSError, KeyFileError) as exc:  # keep serving with the keys we have
            log.error("API keys not reloaded, the previous ones stay in use: %s", exc)
            return
        if not keys and not self._inline_keys:
            log.error("API keys not reloaded: %s has no keys, the previous ones stay in use", self.path)
            return
        self._file_keys, self._file_state = keys, state
        log.info("API keys reloaded from %s: %s", self.path, ", ".join(k.name for k in self.keys))

    def verify(self, presented: str) -> ApiKey | None:
        """The key ``presented`` is, or None. Every stored digest is compared, in constant time."""
        self._reload_if_changed()
        digest = digest_of(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.transports.http.api_keys", description="Make API keys for btd.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a key: print it once, and its line for the keys file")
    new.add_argument("name", help="who holds the key, e.g. pacs-router (letters, digits, . _ -)")
    new.add_argument("--scopes", default="", help=f"comma list of {', '.join(SCOPES)} (default: all)")
    new.add_argument("--key-out", type=Path, metavar="FILE",
                     help="write the key to FILE (created, mode 0600) instead of printing it")
    hash_cmd = commands.add_parser("hash", help="the keys-file line for an existing key read from stdin")
    hash_cmd.add_argument("name")
    hash_cmd.add_argument("--scopes", default="")
    args = parser.parse_args(argv)
    scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
    if not _NAME.match(args.name) or set(scopes) - set(SCOPES):
        parser.error(f"the name must be 1-64 of [A-Za-z0-9._-]; scopes are {', '.join(SCOPES)}")
    if args.command == "new":
        key = new_key()
        # The line (a hash) on stdout, to append to the keys file; the key itself once, on stderr or to a file.
        if args.key_out is not None:
            try:
                fd = os.open(args.key_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                parser.error(f"cannot create {args.key_out}: {exc.strerror}")
            with os.fdopen(fd, "w") as out:
                out.write(key + "\n")
            print(f"API key for {args.name} written to {args.key_out}", file=sys.stderr)
        else:
            print(f"API key for {args.name} (shown once, stored nowhere): {key}", file=sys.stderr)
        print(key_line(args.name, key, scopes))
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        parser.error("give the key on stdin")
    print(key_line(args.name, key, scopes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
