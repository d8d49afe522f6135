"""A private network namespace for the calling thread: only a loopback interface, nothing reachable
from outside and nothing outside reachable. Every process started from this thread meanwhile
(Orthanc, ``btd dicom-listen``, the service) lives in it too, so their ports are exposed to no one.

Namespaces belong to threads in Linux: ``unshare(CLONE_NEWNET)`` moves only the calling thread, and
``setns`` moves it back. Needs CAP_SYS_ADMIN (root, as in CI); without it the caller falls back to
binding 127.0.0.1 only and says so.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


@contextmanager
def private_network() -> Iterator[bool]:
    """Move this thread into a new network namespace (loopback up) for the block; yields True, or False
    when namespaces cannot be made here (then nothing changes: bind 127.0.0.1 only)."""
    libc = _libc()
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            yield False
            return
        try:
            _loopback_up()
            yield True
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to the original network namespace")
    finally:
        os.close(original)


def in_private_network() -> bool:
    """Whether this thread sees no interface but loopback (a check for the tests themselves)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]
