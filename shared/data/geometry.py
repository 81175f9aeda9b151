"""One orientation (RAS) and, when asked, one voxel spacing for images that carry patient axes.

NIfTI files and DICOM series folders say, through their affine, where each voxel lies in the
patient: the same scan can be stored with its x axis flipped (``LAS`` vs ``RAS``), with axes
permuted, or at other voxel sizes. :func:`to_canonical` brings such an image to

* the **RAS** orientation (MONAI ``Orientation(axcodes="RAS")``: first axis towards the
  patient's Right, then Anterior, then Superior), always; a single slice stored as ``H x W x 1``
  is oriented as the volume it is a slice of, then its slice axis is dropped;
* the voxel ``spacing`` in millimetres (MONAI ``Spacing``: bilinear for images, nearest for
  masks), when the run or the site asks for one; an empty spacing keeps the file's own.

PNG/JPEG and single DICOM images (radiographs, one slice) have no patient axes to speak of in
their pixel order: they are used as stored (the display orientation), see ``docs/images.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

__all__ = ["axis_codes", "to_canonical", "CANONICAL"]

CANONICAL = "RAS"
"""The orientation every image with patient axes is brought to."""
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_AXIS_OF = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def axis_codes(affine: np.ndarray | torch.Tensor) -> str:
    """The orientation codes of a ``(4, 4)`` voxel-to-RAS affine, e.g. ``"LPS"`` or ``"RAS"``.

    Each letter says towards which side of the patient that array axis increases (the nearest
    one for oblique axes).
    """
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def to_canonical(
    image: MetaTensor,
    *,
    spacing: Sequence[float] = (),
    slice_axis: int | None = None,
    mask: bool = False,
) -> MetaTensor:
    """Reorient ``image`` to RAS and, if ``spacing`` is given, resample it to that voxel size.

    Parameters
    ----------
    image
        ``(C, X, Y, Z)`` with its voxel-to-RAS ``affine``.
    spacing
        Millimetres per axis after reorientation: ``()`` keeps the native spacing, one value
        applies to every axis, else one value per spatial axis of the result (2 for a slice,
        3 for a volume).
    slice_axis
        For a single slice stored as a volume (``Z == 1``: pass ``2``): that axis is dropped
        after reorientation, wherever RAS puts it, so the result is ``(C, H, W)``; its
        thickness is kept (``spacing`` then gives the in-plane sizes).
    mask
        Nearest-neighbour resampling (class indices) instead of bilinear.

    Returns
    -------
    MetaTensor
        ``(C, *spatial)`` in RAS order (a slice: its two in-plane axes in R, A, S order).
    """
    codes = axis_codes(image.affine)
    # The affine maps to RAS millimetres (MONAI's readers and read_dicom_series convert DICOM's LPS).
    out = Orientation(axcodes=CANONICAL, labels=_RAS_LABELS)(image)
    dropped = None if slice_axis is None else _AXIS_OF[codes[slice_axis]]
    if spacing:
        in_plane = [a for a in range(3) if a != dropped]
        values = list(spacing) * (len(in_plane) if len(spacing) == 1 else 1)
        if len(values) != len(in_plane):
            raise ValueError(
                f"spacing has {len(spacing)} values but the images have {len(in_plane)} spatial axes: "
                f"give one value or {len(in_plane)}."
            )
        pixdim = [0.0] * 3  # 0 keeps the native size (MONAI's Spacing), used for a slice's thickness
        for axis, value in zip(in_plane, values, strict=True):
            pixdim[axis] = float(value)
        out = Spacing(pixdim=pixdim, mode="nearest" if mask else "bilinear")(out)
    if dropped is not None:
        out = out.squeeze(dropped + 1)
    assert isinstance(out, MetaTensor)
    return out
