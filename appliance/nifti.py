"""Masks to NIfTI with the scan's geometry (DICOM LPS converted to NIfTI's RAS)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from appliance.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def affine_of(volume: Volume) -> np.ndarray:
    """4x4 voxel-index -> RAS mm affine for an array with the volume's axis order."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ (volume.direction.T * np.asarray(volume.spacing))
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(volume.origin)
    return affine


def save_mask(path: str | Path, mask: np.ndarray, volume: Volume) -> Path:
    """Write a uint8 label mask on the volume's grid; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine_of(volume))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path
