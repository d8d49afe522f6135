"""Schemathesis extensions for this API, for the in-process tests and the CLI
(``SCHEMATHESIS_HOOKS=tests.api.schemathesis_hooks schemathesis run ...``)."""

from pathlib import Path

import schemathesis
from pydicom.data import get_testdata_file


@schemathesis.serializer("application/dicom")
def dicom_body(ctx, value):
    """A schema-valid DICOM body is a DICOM file: send a real one (pydicom's MR test slice), as
    schemathesis itself sends real sample files for image/png and image/jpeg."""
    return Path(get_testdata_file("MR_small.dcm")).read_bytes()
