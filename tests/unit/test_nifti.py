"""Reading a NIfTI volume into axial slices (``app.core.nifti``): orientation, limits, refusals."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest

from app.core.errors import InvalidImage, PayloadTooLarge
from app.core.nifti import looks_like_nifti, read_volume

nib = pytest.importorskip("nibabel")
LIMITS = {"max_bytes": 8 << 20, "max_slices": 64, "max_pixels": 4096}


def nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None, *, compress: bool = False, version: int = 1,
                slope: float | None = None) -> bytes:
    image = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(data, np.eye(4) if affine is None else affine)
    if slope is not None:
        image.header.set_slope_inter(slope, 10.0)
    raw = image.to_bytes()
    return gzip.compress(raw) if compress else raw


def marked_volume() -> np.ndarray:
    """x 8, y 6, z 4 voxels (RAS+: x grows to the patient's right), a voxel marked at the patient's far left
    (x 0) and front (y 5) of each slice k."""
    volume = np.zeros((8, 6, 4), np.int16)
    for k in range(4):
        volume[0, 5, k] = 100 + k
    return volume


def test_slices_come_feet_to_head_anterior_up_and_patient_right_on_the_left():
    volume = read_volume(nifti_bytes(marked_volume(), np.diag([2.0, 2.0, 3.0, 1.0])), **LIMITS)
    assert volume.shape == (8, 6, 4) and len(volume) == 4
    assert volume.positions == [0.0, 3.0, 6.0, 9.0]
    for k, plane in enumerate(volume.slice(k) for k in range(len(volume))):
        assert plane.shape == (6, 8) and plane.dtype == np.float32
        assert plane[0, -1] == 100 + k  # row 0 anterior; the patient's left on the image's right (radiological)
        assert np.count_nonzero(plane) == 1


def test_another_storage_orientation_gives_the_same_slices():
    ras = read_volume(nifti_bytes(marked_volume()), **LIMITS)
    # the same anatomy stored LPI (x and y and z flipped): the affine says so
    flipped = marked_volume()[::-1, ::-1, ::-1].copy()
    affine = np.diag([-1.0, -1.0, -1.0, 1.0])
    affine[:3, 3] = [7, 5, 3]
    lpi = read_volume(nifti_bytes(flipped, affine, compress=True, version=2), **LIMITS)
    assert lpi.positions == ras.positions
    for a, b in zip(map(ras.slice, range(4)), map(lpi.slice, range(4))):
        np.testing.assert_array_equal(a, b)


def test_scale_slope_and_intercept_are_applied():
    plane = read_volume(nifti_bytes(marked_volume(), slope=2.0), **LIMITS).slice(1)
    assert plane.max() == 2.0 * 101 + 10.0 and plane.min() == 10.0


def test_a_4d_volume_with_one_volume_is_read_and_a_series_of_volumes_refused():
    one = read_volume(nifti_bytes(marked_volume()[..., None]), **LIMITS)
    assert len(one) == 4
    with pytest.raises(InvalidImage, match="4-D"):
        read_volume(nifti_bytes(np.zeros((8, 6, 4, 2), np.int16)), **LIMITS)
    with pytest.raises(InvalidImage, match="2-D"):
        read_volume(nifti_bytes(np.zeros((8, 6), np.int16)), **LIMITS)


def test_non_finite_voxels_become_the_slice_minimum_with_a_warning():
    data = np.ones((8, 6, 4), np.float32)
    data[2, 2, 1] = np.nan
    volume = read_volume(nifti_bytes(data), **LIMITS)
    assert np.isfinite(volume.slice(1)).all() and volume.warnings


def test_a_gzip_bomb_stops_at_the_limit():
    bomb = gzip.compress(b"\0" * (9 << 20))
    assert len(bomb) < 20_000 and looks_like_nifti(bomb)
    with pytest.raises(PayloadTooLarge, match="inflates"):
        read_volume(bomb, **LIMITS)


def test_limits_on_slices_and_pixels():
    with pytest.raises(PayloadTooLarge):
        read_volume(nifti_bytes(np.zeros((8, 6, 80), np.int16)), **LIMITS)
    with pytest.raises(PayloadTooLarge):
        read_volume(nifti_bytes(np.zeros((70, 70, 4), np.int16)), **LIMITS)


@pytest.mark.parametrize("body", [b"\x89PNG\r\n\x1a\n" + b"\0" * 400, gzip.compress(b"not a nifti" * 100),
                                  b"\0" * 10])
def test_what_is_not_a_single_file_nifti_is_refused(body):
    with pytest.raises(InvalidImage):
        read_volume(body, **LIMITS)


def test_truncated_data_is_refused():
    data = nifti_bytes(np.ones((8, 6, 4), np.int16))
    with pytest.raises(InvalidImage):
        read_volume(data[:-40], **LIMITS)
    assert not looks_like_nifti(io.BytesIO(b"GIF89a").read())
