"""A NIfTI volume (``.nii`` or ``.nii.gz``) -> its axial slices, in order, under limits.

The rule: the bytes decide, not the name or the Content-Type. A gzip stream (signature ``1f 8b``) is
inflated in pieces, and refused (413) once it grows past ``max_bytes``: a few KB of gzip can inflate to
gigabytes. What is left must be a single-file NIfTI-1 or NIfTI-2 (``sizeof_hdr`` 348 with magic
``n+1``, or 540 with ``n+2``; either byte order); a header-only pair (``ni1``) or ANALYZE is refused.
It must be a volume: three dimensions, or four with one volume (``dim[4] == 1``); a 2-D image or a
4-D series of volumes (fMRI, DWI: which volume would be meant?) is refused (400). Its data is
reoriented to the closest canonical orientation (RAS+: nibabel's ``as_closest_canonical``) and cut
along the third axis, feet to head; each slice is shown radiologically (anterior at the top, the
patient's right on the image's left), the way the model's training slices are, with the scale slope
and intercept applied in float32. Non-finite voxels (NaN masks) become the slice's lowest value.

nibabel reads it (``from_bytes``): no file is written.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from app.core.errors import InvalidImage, PayloadTooLarge

NIFTI_MEDIA_TYPE = "application/x-nifti"  # how a NIfTI slice's media type is recorded
GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER, NIFTI2_HEADER = 348, 540


# Memory a volume takes while it is read, as a multiple of its (inflated) file size: the bytes and the
# stored values; its float32 slices are made one at a time (``Volume.slice``). The service holds this
# much of its decode budget while it reads a volume.
VOLUME_MEMORY_FACTOR = 2


@dataclass
class Volume:
    """A volume's axial slices, feet to head: its stored values reoriented to RAS+ (a view), each slice
    made in float32 when it is asked for, so the whole volume is never held in float."""

    stored: np.ndarray  # [x, y, z] in RAS+, the file's data type
    slope: float
    inter: float
    positions: list[float]  # each slice's height (RAS z, mm) in the volume's world space
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.stored.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.stored.shape[2]

    def slice(self, k: int) -> np.ndarray:
        """Slice ``k`` (from the feet), float32 [rows, columns]: rows anterior to posterior, columns the
        patient's right to left (radiological), scale applied, non-finite voxels set to its lowest value."""
        plane = np.asarray(self.stored[:, :, k], dtype=np.float32) * np.float32(self.slope) + np.float32(self.inter)
        plane = np.ascontiguousarray(plane.T[::-1, ::-1])
        finite = np.isfinite(plane)
        if not finite.all():
            plane[~finite] = plane[finite].min() if finite.any() else 0.0
        return plane


def is_gzip(data: bytes) -> bool:
    return data[:2] == GZIP_MAGIC


def inflate(data: bytes, max_bytes: int) -> bytes:
    """A gzip stream inflated in 1 MiB pieces, refused (413) past ``max_bytes``; 400 when corrupt."""
    inflater, out, total, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), [], 0, data
    try:
        while pending and not inflater.eof:
            piece = inflater.decompress(pending, 1 << 20)
            total += len(piece)
            if total > max_bytes:
                raise PayloadTooLarge(f"the gzip stream inflates to more than {max_bytes} bytes (BTD_MAX_VOLUME_BYTES)")
            out.append(piece)
            pending = inflater.unconsumed_tail
    except zlib.error:
        raise InvalidImage("the gzip stream could not be inflated (corrupt)") from None
    if not inflater.eof:
        raise InvalidImage("the gzip stream is truncated")
    return b"".join(out)


def nifti_version(data: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI header at the start of ``data``, else None."""
    for order in ("<", ">"):
        if len(data) >= NIFTI1_HEADER and struct.unpack(order + "i", data[:4])[0] == NIFTI1_HEADER:
            return 1 if data[344:348] == b"n+1\x00" else None
        if len(data) >= NIFTI2_HEADER and struct.unpack(order + "i", data[:4])[0] == NIFTI2_HEADER:
            return 2 if data[4:8] == b"n+2\x00" else None
    return None


def looks_like_nifti(data: bytes) -> bool:
    """The signature check the HTTP route and the CLI make before reading (gzip: any gzip stream)."""
    return is_gzip(data) or nifti_version(data) is not None


def read_volume(data: bytes, *, max_bytes: int, max_slices: int, max_pixels: int) -> Volume:
    """The axial slices of a NIfTI volume (see the module docstring). Typed errors: 400 not a NIfTI
    volume, 413 past the limits."""
    import nibabel as nib
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the NIfTI file is larger than {max_bytes} bytes (BTD_MAX_VOLUME_BYTES)")
    if is_gzip(data):
        data = inflate(data, max_bytes)
    version = nifti_version(data)
    if version is None:
        raise InvalidImage("the body is not a single-file NIfTI-1 or NIfTI-2 volume (.nii or .nii.gz)")
    image_class = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    try:
        header = image_class.header_class.from_fileobj(io.BytesIO(data))
        shape = tuple(int(v) for v in header.get_data_shape())
    except Exception as exc:  # nibabel's header checks: any malformed field
        raise InvalidImage(f"the NIfTI header could not be read ({type(exc).__name__})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        what = "a series of volumes (4-D or more: fMRI, diffusion)" if len(shape) > 3 else f"{len(shape)}-D"
        raise InvalidImage(f"the NIfTI image is {what}; send one 3-D volume")
    if min(shape) < 1:
        raise InvalidImage("the NIfTI volume is empty")
    # the slice axis is not known before reorientation: every axis must fit both limits
    if max(shape) > max_slices or max(a * b for a, b in ((shape[0], shape[1]), (shape[0], shape[2]),
                                                         (shape[1], shape[2]))) > max_pixels:
        raise PayloadTooLarge(f"the NIfTI volume is {'x'.join(map(str, shape))} voxels; at most {max_slices} slices "
                              f"(BTD_MAX_SERIES_SLICES) of {max_pixels} pixels (BTD_MAX_PIXELS)")
    try:
        image = image_class.from_bytes(data)
        raw = np.asanyarray(image.dataobj.get_unscaled()).reshape(shape)  # stored values: no float copy
        transform = ornt_transform(io_orientation(image.affine), axcodes2ornt("RAS"))
        canonical = apply_orientation(raw, transform)  # a view: flips and transposes, no copy
        affine = image.affine @ inv_ornt_aff(transform, shape)
    except (InvalidImage, PayloadTooLarge):
        raise
    except Exception as exc:  # truncated data, a bad datatype...
        raise InvalidImage(f"the NIfTI data could not be read ({type(exc).__name__})") from None
    if canonical.dtype.kind not in "iuf":
        raise InvalidImage(f"the NIfTI data type {canonical.dtype} is not a grayscale number type")
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    warnings = []
    if canonical.dtype.kind == "f" and not np.isfinite(canonical).all():
        warnings.append("the volume has non-finite voxels; they were set to their slice's lowest value")
    positions = [round(float((affine @ np.array([0.0, 0.0, k, 1.0]))[2]), 3) for k in range(canonical.shape[2])]
    return Volume(canonical, slope, inter, positions, warnings)
