"""Volume: a 3D array with its place in patient space, the currency between stages.

Array axes are (0, 1, 2) = (slice, row, column). ``direction[n]`` is the unit vector in
patient LPS coordinates (DICOM's patient system, millimetres) along which array axis ``n``
increases, and ``spacing[n]`` is the step along it. The centre of voxel ``(a0, a1, a2)`` sits at
``origin + sum_n a_n * spacing[n] * direction[n]``.

The canonical orientation used by the pipeline is axis 0 towards the head (+z), axis 1 towards
the back (+y), axis 2 towards the patient's left (+x): exactly how a standard axial series is
stored once its slices are sorted by position along the slice normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CANONICAL_DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@dataclass(frozen=True)
class Volume:
    """A 3D image (HU for CT) with spacing, origin and direction; see the module docstring."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: CANONICAL_DIRECTION.copy())

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"`array` must be 3D, got shape {self.array.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"`spacing` must be three positive numbers, got {self.spacing}")
        d = np.asarray(self.direction, dtype=float)
        if d.shape != (3, 3):
            raise ValueError(f"`direction` must be 3x3, got shape {d.shape}")
        object.__setattr__(self, "direction", d)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around another array of the same shape (a mask, probabilities)."""
        if array.shape[:3] != self.array.shape:
            raise ValueError(f"`array` must have shape {self.array.shape}, got {array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def position(self, index: tuple[float, float, float]) -> np.ndarray:
        """Patient LPS position (mm) of a (possibly fractional) voxel index."""
        steps = np.asarray(index, dtype=float) * np.asarray(self.spacing)
        return np.asarray(self.origin) + steps @ self.direction
