"""``multipart/related`` bodies of DICOM objects (RFC 2387), as DICOMweb uses them (PS3.18 8.6.1.2):
the service's DICOM answers, STOW-RS requests, WADO-RS and service answers read back."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

DICOM = "application/dicom"
_PARAM = re.compile(r';\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)')


def related_content_type(boundary: str, part_type: str = DICOM) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def encode_related(parts: Sequence[bytes], part_type: str = DICOM) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/related message with one part per object."""
    boundary = f"btd-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode("ascii"), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), related_content_type(boundary, part_type)


def media_type_params(content_type: str) -> tuple[str, dict[str, str]]:
    """("type/subtype" in lower case, {parameter: value}) of a Content-Type or Accept entry."""
    bare = content_type.split(";", 1)[0].strip().lower()
    params = {k.lower(): v.strip('"') for k, v in _PARAM.findall(content_type)}
    return bare, params


def decode_related(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """[(part Content-Type, part bytes)] of a multipart/related body; ValueError when it is not one."""
    bare, params = media_type_params(content_type)
    boundary = params.get("boundary")
    if not bare.startswith("multipart/") or not boundary:
        raise ValueError(f"not a multipart body with a boundary: {bare or 'no Content-Type'}")
    delimiter = b"--" + boundary.encode("latin-1")
    sections = body.split(b"\r\n" + delimiter)
    first = sections[0]
    if not first.startswith(delimiter):  # a preamble before the first delimiter
        start = first.find(delimiter)
        if start < 0:
            raise ValueError("the multipart body has no part")
        first = first[start:]
    sections[0] = first[len(delimiter):]
    parts: list[tuple[str, bytes]] = []
    for section in sections:
        if section.startswith(b"--"):  # the close delimiter
            break
        head, sep, content = section.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part has no header/body separator")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers.get("content-type", params.get("type", "")), content))
    return parts
