"""What both Orthanc round trips share: a private network namespace (loopback only) around the module."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from tests.pacs import orthanc
from tests.pacs.netns import in_private_network, private_network


@pytest.fixture(scope="module")
def network() -> Iterator[bool]:
    """Skips without Orthanc; True inside a private network namespace, False where none can be made."""
    reason = orthanc.available()
    if reason:
        pytest.skip(reason)
    with private_network() as private:
        if private:
            assert in_private_network()
        else:
            warnings.warn("no private network namespace here (unshare needs root): the listener and the service "
                          "bind 127.0.0.1 only; Orthanc 1.10 has no bind address setting, so its ports listen on "
                          "every interface meanwhile (its HTTP refuses remote clients)", stacklevel=1)
        yield private
