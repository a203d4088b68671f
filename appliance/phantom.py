"""Synthetic chest CT ("phantom") with exact truth: anatomy, disease and serial course, as arrays.

The patient is defined in continuous millimetres (analytic surfaces and fields evaluated at voxel
centres), so one seed gives the same patient on any grid: ``synthesize(seed, spacing=(3, 3, 3),
shape=(128, 128, 128))`` for training and ``shape=(300, 512, 512)`` for a full series differ
only by sampling. Same seed and arguments give bit-identical output.

Patient frame (mm): X towards the patient's left, Y towards the back, Z towards the head, with
X = 0 on the midline, Y = 0 at the centre of the trunk and Z = 0 at the carina. The arrays are in
the canonical orientation of :mod:`appliance.volume` (axis 0 = +Z, axis 1 = +Y, axis 2 = +X), so
the patient's right lung lies at low column indices.

What is modelled: body outline with skin, fat and muscle, ribs with costal cartilage, spine,
sternum, clavicles, scapulae, heart, great vessels, oesophagus, mediastinal fat, diaphragm domes
with liver, stomach and spleen below, two lungs (cavity minus mediastinum, below the apex caps,
above the domes) split into five lobes by curved oblique and horizontal fissures, a space-filling
bronchial tree with the pulmonary arteries beside it and a separate venous tree, the table.
Disease comes from :mod:`appliance.lesions` (the model also used on real scans). Acquisition:
slice thickness (partial volume along z), correlated noise with a kernel-dependent texture,
reconstruction circle, optional breathing artefact, vendor and kernel in ``meta``.

Speed: fields are computed slab by slab (a few slices at a time, so temporaries stay in cache);
tubes are drawn in their bounding boxes; smooth random fields live on coarse lattices fixed in
the patient frame and are interpolated. Nothing here reads or writes files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from appliance import lesions as _lesions
from appliance.labels import Lobe

SEVERITIES = _lesions.SEVERITIES

AIR_HU = -1000.0
PADDING_HU = -1024
"""Outside the reconstruction circle, as Siemens and most readers show it."""
FAT_HU = -100.0
MUSCLE_HU = 45.0
BLOOD_HU = 40.0
LIVER_HU = 58.0
SPLEEN_HU = 48.0
CORTEX_HU = 850.0
MARROW_HU = 230.0
CARTILAGE_HU = 130.0
LUNG_HU = -875.0
"""Parenchyma between visible vessels at mid depth (the gravity gradient adds to it)."""
AIRWAY_WALL_HU = 20.0
WALL_MM = 10.0
"""Ribs and intercostal muscle between the pleura and the outer muscles."""

VENDORS: tuple[dict, ...] = (
    {
        "manufacturer": "SIEMENS",
        "model": "SOMATOM Definition AS",
        "kernels": ("B41s", "B31f", "B70f", "I70f"),
        "kvp": (110, 120),
        "noise": (1.0, 0.8, 2.6, 2.2),
    },
    {
        "manufacturer": "GE MEDICAL SYSTEMS",
        "model": "LightSpeed VCT",
        "kernels": ("STANDARD", "SOFT", "LUNG", "BONE"),
        "kvp": (100, 120),
        "noise": (1.0, 0.8, 2.8, 2.4),
    },
    {
        "manufacturer": "Philips",
        "model": "Ingenuity CT",
        "kernels": ("B", "A", "L", "YA"),
        "kvp": (120, 120),
        "noise": (1.0, 0.85, 2.6, 2.3),
    },
    {
        "manufacturer": "TOSHIBA",
        "model": "Aquilion ONE",
        "kernels": ("FC08", "FC03", "FC52", "FC86"),
        "kvp": (100, 120),
        "noise": (1.0, 0.85, 2.7, 2.5),
    },
)
"""Scanner makes with their soft/smooth/lung/sharp kernels and relative noise per kernel."""
KERNEL_CUTOFF = (0.42, 0.34, 0.80, 0.70)
"""Noise power spectrum cut-off (cycles/mm) of the four kernel kinds above."""
THICKNESSES = (0.625, 1.0, 1.25, 1.5, 2.0, 2.5)
"""Reconstructed slice thicknesses offered by the vendors above (mm)."""

_TAG = {"anatomy": 1, "trees": 2, "acq": 3, "noise": 4, "lesions": 5, "texture": 6, "motion": 7}


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent random stream per (seed, purpose, ...): a new purpose shifts no other."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, *keys]))


# ============================================================================ public API


@dataclass
class Phantom:
    """One synthetic scan with its exact truth (canonical orientation, see the module docstring)."""

    hu: np.ndarray
    """int16 HU."""
    lobes: np.ndarray
    """uint8 0-5 (appliance.labels.Lobe)."""
    opacity: np.ndarray
    """uint8 0-2 (appliance.labels.Opacity), only where lobes > 0."""
    spacing: tuple[float, float, float]
    """mm (z, y, x)."""
    origin: tuple[float, float, float]
    """LPS mm of the centre of voxel (0, 0, 0), (x, y, z) order as DICOM ImagePositionPatient."""
    meta: dict = field(default_factory=dict)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"`seed` must be in [0, 2**63), got {seed}")
    return int(seed)


def _check_triple(name: str, value: object, kind: type) -> tuple:
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"`{name}` must be a sequence of three numbers, got {value!r}") from None
    if len(items) != 3 or not all(
        isinstance(v, (int, float, np.integer, np.floating)) for v in items
    ):
        raise ValueError(f"`{name}` must be three numbers, got {value!r}")
    out = tuple(kind(v) for v in items)
    if min(out) <= 0 or not all(math.isfinite(float(v)) for v in out):
        raise ValueError(f"`{name}` must be positive, got {value!r}")
    return out


def synthesize(
    seed: int,
    severity: str = "moderate",
    *,
    spacing: tuple[float, float, float] = (1.0, 0.7, 0.7),
    shape: tuple[int, int, int] = (300, 512, 512),
    thickness: float | None = None,
    day: int = 0,
    motion: bool = False,
) -> Phantom:
    """The patient of ``seed`` scanned ``day`` days after the baseline, on a grid of ``shape``
    voxels of ``spacing`` mm centred on the chest (with the seed's own small offsets).

    ``thickness`` (mm) is the reconstructed slice thickness: partial volume along z and noise
    follow it; None means contiguous slices (thickness = spacing[0]). ``motion`` adds a
    breathing artefact near the lung bases (the truth moves with the image).
    """
    seed = _check_seed(seed)
    if severity not in SEVERITIES:
        raise ValueError(f"`severity` must be one of {SEVERITIES}, got {severity!r}")
    spacing = _check_triple("spacing", spacing, float)
    shape = _check_triple("shape", shape, int)
    if isinstance(day, bool) or not isinstance(day, (int, np.integer)) or day < 0:
        raise ValueError(f"`day` must be a non-negative int, got {day!r}")
    if thickness is not None:
        if not isinstance(thickness, (int, float, np.floating)) or not 0 < float(thickness) <= 20:
            raise ValueError(f"`thickness` must be a number in (0, 20] mm, got {thickness!r}")
        thickness = float(thickness)
    if int(np.prod(shape)) > 2**31 - 1:
        raise ValueError(f"`shape` must hold fewer than 2**31 voxels, got {shape}")
    patient = Patient(seed)
    acq = _Acquisition(patient, spacing, thickness, int(day))
    grid = _Grid.make(patient, shape, spacing)
    return _Renderer(patient, grid, acq, severity, int(day), bool(motion)).run()


def patient_summary(seed: int) -> dict:
    """What a caller needs before synthesising: sex, age, body and lung extents (mm), scanner.

    The CLI uses it to choose a realistic field of view (pixel spacing) and z coverage.
    """
    p = Patient(_check_seed(seed))
    acq = _Acquisition(p, (1.0, 0.7, 0.7), None, 0)
    return {
        "patient_id": p.patient_id,
        "sex": p.sex,
        "age": p.age,
        "body_width_mm": 2 * p.body_half_width,
        "body_depth_mm": p.body_depth,
        "lung_top_mm": p.z_top,
        "lung_bottom_mm": p.z_bottom,
        "manufacturer": acq.vendor["manufacturer"],
        "model": acq.vendor["model"],
        "kernel": acq.kernel,
        "kvp": acq.kvp,
    }


# ============================================================================ the patient


class Patient:
    """Anatomical parameters of one seed (mm, patient frame). Pure numbers: no grid here."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        r = _rng(seed, _TAG["anatomy"])
        u = r.uniform
        self.sex = "M" if r.random() < 0.55 else "F"
        self.age = int(np.clip(r.normal(55, 15), 21, 88))
        s = float(np.clip(r.normal(1.0, 0.055), 0.88, 1.14)) * (1.03 if self.sex == "M" else 0.95)
        self.s = s
        q = float(np.clip(r.normal(1.0, 0.06), 0.86, 1.14))  # lung height (inspiration, build)
        self.patient_id = f"PH{seed:06d}" if seed < 10**6 else f"PH{seed}"
        # Pleural cavity: superellipse-like section, widest low in the chest.
        self.cav_a = 134.0 * s * u(0.94, 1.06)
        self.cav_b = 94.0 * s * u(0.92, 1.08)
        self.cav_yc = 6.0 + u(-4, 4)
        self.square = u(0.05, 0.25)  # blend towards a rounded square section
        self.body_square = u(0.1, 0.4)
        self.front_taper = u(0.08, 0.2)  # narrower in front: a kidney-shaped section
        self.z_w = -60.0 * q
        # Apex, domes, posterior sulcus.
        self.z_apex = (102.0 + r.normal(0, 7)) * q
        self.z_apex_l = self.z_apex + r.normal(0, 4)
        self.apex_x = 48.0 * s
        self.apex_y = self.cav_yc + 22.0
        self.apex_k = 45.0 * u(0.85, 1.15)
        self.apex_r = 40.0 * s * u(0.9, 1.1)
        self.apex_kx = 100.0 / (85.0 * s * u(0.9, 1.1)) ** 2  # drop (mm) per mm^2 sideways
        self.z_dome_r = -(92.0 + r.normal(0, 9)) * q
        self.z_dome_l = self.z_dome_r - u(8, 24)
        self.dome_x = (-55.0 * s, 62.0 * s)
        self.dome_y = self.cav_yc - 18.0
        self.dome_cx = (78.0 * s) ** 2 / u(30, 45)
        self.dome_cy_post = (self.cav_b + 18.0) ** 2 / u(70, 95)
        self.dome_cy_ant = (self.cav_b - 10.0) ** 2 / u(30, 45)
        # Walls.
        self.fat = u(5, 30) * (1.15 if self.sex == "F" else 1.0)
        self.muscle = u(6, 12) * s
        self.rib_pitch = 23.0 * s * u(0.95, 1.05)
        self.rib_drop = 95.0 * u(0.85, 1.15)
        self.rib_phase = u(0, 1)
        # Mediastinum and heart.
        self.med_x = 4.0 + u(-3, 3)
        h = float(np.clip(r.normal(1.0, 0.07), 0.85, 1.25)) * (1.0 + max(0, self.age - 60) * 0.004)
        self.heart_c = np.array(
            [self.z_dome_l + 24.0 * s * h, self.cav_yc - 34.0 * s, 32.0 * s + u(-5, 5)]
        )
        self.heart_ax = np.array([60.0, 50.0, 42.0]) * s * h
        long_axis = np.array([-0.55, -0.45, 0.70]) + r.normal(
            0, 0.06, 3
        )  # (z, y, x): down, front, left
        long_axis /= np.linalg.norm(long_axis)
        second = np.cross(long_axis, [1.0, 0.0, 0.0])
        second /= np.linalg.norm(second)
        self.heart_rot = np.stack([long_axis, second, np.cross(long_axis, second)])
        self.spine_r = 17.0 * s
        self.fissure = {
            side: {
                "z_post": (35.0 + r.normal(0, 9)) * q
                if side == "R"
                else (45.0 + r.normal(0, 9)) * q,
                "y_ant": self.cav_yc - self.cav_b * u(0.30, 0.50),
                "curve": u(-0.25, 0.15),
                "lat": u(-8, 8),
                "warp": [(u(2, 6), u(70, 180), u(0, 2 * math.pi), u(0, math.pi)) for _ in range(3)],
            }
            for side in ("R", "L")
        }
        self.horiz = {
            "z": (-22.0 + r.normal(0, 7)) * q,
            "tilt_y": u(0.06, 0.2),
            "tilt_x": u(-0.08, 0.08),
            "dome": u(0, 4),
            "warp": [(u(1, 3), u(80, 180), u(0, 2 * math.pi), u(0, math.pi)) for _ in range(3)],
        }
        self.lung_offset = r.normal(0, 12)  # inspiration depth, emphysema-free age drift
        self.gravity = u(0.25, 0.55)  # HU per mm towards the back
        self.breast = self.sex == "F" and r.random() < 0.9
        self.breast_size = u(0.6, 1.3)
        # Offsets of the chest within the field of view.
        self.offset = np.array([r.uniform(-12, 12), r.uniform(-10, 6), r.uniform(-10, 10)])
        self.table_z = float(r.uniform(-260, -120))

    # ---------------------------------------------------------------- extents (for FOV/CLI)
    @property
    def z_top(self) -> float:
        return max(self.z_apex, self.z_apex_l)

    @property
    def z_bottom(self) -> float:
        """Lowest lung point: posterior costophrenic sulcus of the lower dome."""
        y_back = self.cav_yc + self.cav_b - self.dome_y
        return min(self.z_dome_r, self.z_dome_l) - y_back**2 / self.dome_cy_post

    @property
    def z_centre(self) -> float:
        return 0.5 * (self.z_top + self.z_bottom)

    @property
    def body_half_width(self) -> float:
        return self.body_a + 18.0 * self.s

    @property
    def body_depth(self) -> float:
        return self.y_back - (self.body_yc - self.body_b)

    @property
    def body_a(self) -> float:
        return self.cav_a + WALL_MM + 0.5 * self.muscle + self.fat + 2.0

    @property
    def body_b(self) -> float:
        return self.cav_b + WALL_MM + self.muscle + 8.0 * self.s + self.fat

    @property
    def body_yc(self) -> float:
        return self.cav_yc + 12.0

    @property
    def y_back(self) -> float:
        """The back lies flat on the table here."""
        return self.cav_yc + self.cav_b + WALL_MM + self.muscle + 30.0 * self.s + 0.6 * self.fat

    def body(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Half-width, half-depth and centre y of the body outline at heights z (the shoulders
        stay wide where the pleural cavity narrows to the apices)."""
        below = np.clip((self.z_w - z) / 140.0, 0.0, 1.5)
        sh = np.clip((z - (self.z_top - 70.0)) / 60.0, 0.0, 1.0)
        a = self.body_a * (1.0 - 0.05 * below * below) + 18.0 * self.s * sh
        b = self.body_b * (1.0 - 0.02 * below) + 6.0 * sh
        return (
            a.astype(np.float32),
            b.astype(np.float32),
            np.full_like(a, self.body_yc, dtype=np.float32),
        )

    # ---------------------------------------------------------------- profiles along Z
    def cavity(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Half-width A, half-depth B and centre y of the pleural cavity section at heights z."""
        # an elliptic dome over the upper chest: the apices are narrow and rounded
        z_s = self.z_top - 125.0
        t = np.clip((z - z_s) / (self.z_top + 12.0 - z_s), 0.0, 1.0)
        below = np.clip((self.z_w - z) / 140.0, 0.0, 1.5)
        dome = np.sqrt(np.clip(1.0 - t**2.4, 0.0, 1.0))
        a = self.cav_a * (1.0 - 0.05 * below * below) * (0.3 + 0.7 * dome)
        # the ribs follow the lungs into the apices (the apex cap's parabola, a little outside)
        a_apex = (
            6.0
            + self.apex_x
            + abs(self.med_x)
            + np.sqrt(np.clip(self.z_top + 6.0 - z, 0.0, None) / self.apex_kx)
        )
        a = np.maximum(np.minimum(a, a_apex), 40.0)
        b = self.cav_b * (1.0 - 0.02 * below) * (0.55 + 0.45 * dome)
        yc = self.cav_yc + 22.0 * t**3
        return a.astype(np.float32), b.astype(np.float32), yc.astype(np.float32)

    def spine_y(self, z: np.ndarray) -> np.ndarray:
        """y of the centre of the vertebral body at heights z."""
        _a, b, yc = self.cavity(z)
        return yc + 0.60 * b

    # ---------------------------------------------------------------- lung surfaces
    def dome(self, x: np.ndarray, y: np.ndarray, right: np.ndarray | bool) -> np.ndarray:
        """Height of the diaphragm under the lung at (x, y); ``right`` selects the dome."""
        zr = self._dome_side(x, y, 0)
        zl = self._dome_side(x, y, 1)
        return np.where(right, zr, zl)

    def _dome_side(self, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
        z0 = self.z_dome_r if side == 0 else self.z_dome_l
        dx = x - self.dome_x[side]
        dy = y - self.dome_y
        cy = np.where(dy > 0, self.dome_cy_post, self.dome_cy_ant)
        return z0 - dx * dx / self.dome_cx - dy * dy / cy

    def apex_cap(self, x: np.ndarray, y: np.ndarray, right: np.ndarray | bool) -> np.ndarray:
        """Height of the lung top (apex dome) above (x, y)."""
        z0 = np.where(right, self.z_apex, self.z_apex_l)
        dx = np.abs(x - self.med_x) - self.apex_x
        dy = y - self.apex_y
        return (
            z0
            - self.apex_kx * dx * dx
            - self.apex_k * (1.0 - np.exp(dy * dy * (-0.5 / self.apex_r**2)))
        )

    def oblique(self, x: np.ndarray, y: np.ndarray, right: np.ndarray | bool) -> np.ndarray:
        """Height of the oblique fissure at (x, y): posterior-superior to anterior-inferior."""
        zr = self._oblique_side(x, y, "R")
        zl = self._oblique_side(x, y, "L")
        return np.where(right, zr, zl)

    def _oblique_side(self, x: np.ndarray, y: np.ndarray, side: str) -> np.ndarray:
        f = self.fissure[side]
        z_dome = self.z_dome_r if side == "R" else self.z_dome_l
        y_post = self.cav_yc + self.cav_b - 8.0
        z_ant = z_dome - 12.0
        slope = (f["z_post"] - z_ant) / (y_post - f["y_ant"])
        t = y - f["y_ant"]
        span = y_post - f["y_ant"]
        z = z_ant + slope * t + f["curve"] * t * (span - t) / 100.0
        z = z + f["lat"] * (np.abs(x) - 80.0) / 80.0
        for amp, wave, phase, ang in f["warp"]:
            z = z + amp * np.sin(
                (x * math.cos(ang) + y * math.sin(ang)) * (2 * math.pi / wave) + phase
            )
        return z

    def horizontal(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the right horizontal fissure at (x, y)."""
        h = self.horiz
        dx = (x + 70.0 * self.s) / (80.0 * self.s)
        z = (
            h["z"]
            + h["tilt_y"] * (y - self.cav_yc)
            + h["tilt_x"] * (x + 70.0)
            + h["dome"] * (1 - dx * dx)
        )
        for amp, wave, phase, ang in h["warp"]:
            z = z + amp * np.sin(
                (x * math.cos(ang) + y * math.sin(ang)) * (2 * math.pi / wave) + phase
            )
        return z

    # ---------------------------------------------------------------- mediastinal tubes
    @cached_property
    def tubes(self) -> dict[str, list[tuple[np.ndarray, float]]]:
        """Centre lines (z, y, x) with radii of the mediastinal tubes, by tissue."""
        s = self.s
        yc = self.cav_yc
        hz = float(self.heart_c[0])
        age = 1.0 + max(0, self.age - 50) * 0.005
        ra = 14.5 * s * age
        vessels = [
            # ascending aorta, arch, descending aorta
            [
                ((hz + 35, yc - 25, 6), ra),
                ((35, yc - 22, 4), ra),
                ((50, yc - 2, 8), ra * 0.92),
                ((36, yc + 28, 20 * s), ra * 0.85),
                ((-20, yc + 44, 23 * s), ra * 0.82),
                ((self.z_dome_l - 40, yc + 48, 14), ra * 0.78),
                ((self.z_dome_l - 200, yc + 50, 8), ra * 0.75),
            ],
            # pulmonary trunk and arteries
            [((hz + 30, yc - 45, 20 * s), 13 * s), ((-8, yc - 12, 12 * s), 13 * s)],
            [
                ((-8, yc - 12, 12 * s), 11 * s),
                ((-8, yc - 2, -10 * s), 10.5 * s),
                ((-14, yc + 4, -42 * s), 9 * s),
            ],
            [
                ((-8, yc - 12, 12 * s), 11 * s),
                ((2, yc + 6, 30 * s), 10.5 * s),
                ((-6, yc + 18, 46 * s), 9 * s),
            ],
            # superior vena cava, brachiocephalic veins, brachiocephalic arteries
            [((48, yc - 16, -22 * s), 10 * s), ((hz + 40, yc - 12, -27 * s), 11 * s)],
            [((self.z_top + 40, yc - 10, -46 * s), 7 * s), ((48, yc - 16, -22 * s), 8 * s)],
            [
                ((self.z_top + 5, yc - 20, 48 * s), 6 * s),
                ((56, yc - 24, 0), 6.5 * s),
                ((48, yc - 16, -22 * s), 7 * s),
            ],
            [((50, yc - 6, 4), 7 * s), ((self.z_top + 60, yc - 14, -14 * s), 6.5 * s)],
            [((52, yc - 2, 12 * s), 4.5 * s), ((self.z_top + 60, yc - 4, 22 * s), 4.5 * s)],
            [
                ((48, yc + 12, 20 * s), 5.5 * s),
                ((self.z_top + 20, yc + 14, 36 * s), 5.5 * s),
                ((self.z_top + 10, yc - 5, 75 * s), 5 * s),
            ],
            # inferior vena cava, azygos
            [
                ((hz - 30, yc + 2, -18 * s), 12 * s),
                ((self.z_dome_r - 200, yc + 22, -20 * s), 11 * s),
            ],
            [
                ((self.z_dome_r - 150, yc + 52, -12 * s), 4 * s),
                ((-5, yc + 50, -14 * s), 4 * s),
                ((10, yc + 20, -18 * s), 5 * s),
                ((10, yc + 5, -22 * s), 6 * s),
            ],
        ]
        oesophagus = [
            [
                ((self.z_top + 60, yc + 34, 2), 8 * s),
                ((0, yc + 38, 6), 8 * s),
                ((self.z_dome_l - 30, yc + 32, 16 * s), 9 * s),
            ]
        ]
        airway = [
            [
                ((self.z_top + 80, yc + 4, 0.0), 9.5 * s),
                ((self.z_top - 20, yc + 10, 0.0), 9.5 * s),
                ((0.0, yc + 18, 1.0), 9.0 * s),
            ],
            [((0.0, yc + 18, 1.0), 7.2 * s), ((-20 * s, yc + 16, -38 * s), 6.2 * s)],
            [((0.0, yc + 18, 1.0), 6.8 * s), ((-40 * s, yc + 26, 46 * s), 5.8 * s)],
        ]
        return {"vessel": vessels, "oesophagus": oesophagus, "airway": airway}

    @cached_property
    def hila(self) -> dict[str, np.ndarray]:
        """Where the lobar trees start (z, y, x): bronchi/arteries and veins, per side."""
        s = self.s
        yc = self.cav_yc
        return {
            "R": np.array([-20 * s, yc + 16, -38 * s]),
            "L": np.array([-40 * s, yc + 26, 46 * s]),
            "vR": np.array([float(self.heart_c[0]) + 12, yc + 10, -30 * s]),
            "vL": np.array([float(self.heart_c[0]) + 10, yc + 14, 40 * s]),
        }

    # ---------------------------------------------------------------- lungs at points
    def lung_sdf_points(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Approximate signed distance (mm, negative inside) to the lungs and the lobe label,
        at points p (N, 3) in (z, y, x). Used for tree seeding and lesion lattices."""
        z = p[:, 0].astype(np.float32)
        y = p[:, 1].astype(np.float32)
        x = p[:, 2].astype(np.float32)
        sdf, lobes = _lung_fields(self, z, y, x, np.float32(1.0))
        return sdf, lobes

    def lung_sdf_grid(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The same on the grid z x y x x (sorted 1D axes, mm): tubes only in their boxes."""
        Z = np.asarray(z, np.float32)[:, None, None]
        Y = np.asarray(y, np.float32)[None, :, None]
        X = np.asarray(x, np.float32)[None, None, :]
        a, b, yc = self.cavity(Z)
        dc, _rho = _superellipse_dc(X, Y - yc, a, b, np.float32(self.square), self.front_taper)
        right = X < np.float32(self.med_x)
        cap = (Z - self.apex_cap(X, Y, right)) * np.float32(0.8)
        dia = (self.dome(X, Y, right) - Z) * np.float32(0.8)
        med = np.broadcast_to(_mediastinum_sdf(self, Z, Y, X, with_tubes=False), dc.shape).copy()
        _tubes_min(self, med, Z, Y, X, 1.0)
        sdf = np.maximum(np.maximum(dc, cap), np.maximum(dia, -med)).astype(np.float32)
        return sdf, _lobes(self, Z, Y, X, right, sdf < 0)


def _superellipse_dc(x, yp, a, b, square, taper):
    """Radial distance (mm) from the cavity outline (negative inside) and the radius rho.
    The section is a blend of an ellipse and a rounded square, narrower in front."""
    front = np.clip(yp / -b, 0.0, 1.0)
    a = a * (np.float32(1.0) - np.float32(taper) * front * front)
    xn2 = (x / a) ** 2
    yn2 = (yp / b) ** 2
    r2 = np.sqrt(xn2 + yn2)
    r4 = np.sqrt(np.sqrt(xn2 * xn2 + yn2 * yn2))
    rc = (1.0 - square) * r2 + square * r4
    rho = np.sqrt(x * x + yp * yp)
    dc = rho - rho / (rc + np.float32(1e-6))
    return dc, rho


def _capsule_sdf(z, y, x, p0, p1, r0, r1):
    """Signed distance to a tapered capsule from p0 to p1 (z, y, x)."""
    d = np.asarray(p1, dtype=np.float64) - np.asarray(p0, dtype=np.float64)
    l2 = float(d @ d) or 1e-9
    zz = z - np.float32(p0[0])
    yy = y - np.float32(p0[1])
    xx = x - np.float32(p0[2])
    t = (zz * np.float32(d[0] / l2) + yy * np.float32(d[1] / l2)) + xx * np.float32(d[2] / l2)
    np.clip(t, 0.0, 1.0, out=t)
    ez = zz - t * np.float32(d[0])
    ey = yy - t * np.float32(d[1])
    ex = xx - t * np.float32(d[2])
    dist = np.sqrt(ez * ez + ey * ey + ex * ex)
    return dist - (np.float32(r0) + t * np.float32(r1 - r0))


def _heart_sdf(p: Patient, z, y, x):
    c = p.heart_c
    dz = z - np.float32(c[0])
    dy = y - np.float32(c[1])
    dx = x - np.float32(c[2])
    acc = None
    for k in range(3):
        rr = p.heart_rot[k]
        u = (
            dz * np.float32(rr[0] / p.heart_ax[k])
            + dy * np.float32(rr[1] / p.heart_ax[k])
            + dx * np.float32(rr[2] / p.heart_ax[k])
        )
        acc = u * u if acc is None else acc + u * u
    return (np.sqrt(acc) - 1.0) * np.float32(p.heart_ax[1])


def _mediastinum_sdf(p: Patient, z, y, x, *, with_tubes: bool = True, heart: bool = True):
    """Signed distance to the mediastinum (band between the lungs, heart, spine, tubes)."""
    _a, b, yc = p.cavity(z)
    t = np.clip((y - (yc - 50.0)) / 30.0, 0.0, 1.0)
    # anterior junction line below the arch; great vessels and thymic fat above it
    w_ant = 3.0 + 27.0 * np.clip((z - 25.0) / 45.0, 0.0, 1.0)
    w_post = (17.0 + 13.0 * np.clip((z + 10.0) / 50.0, 0.0, 1.0)) * p.s
    w = w_ant + t * (w_post - w_ant)
    sdf = np.abs(x - np.float32(p.med_x)) - w
    # spine and the paravertebral block behind the front of the vertebral body
    ys = p.spine_y(z)
    ex = x * np.float32(1.0 / (p.spine_r + 8.0))
    ey = (y - ys - np.float32(0.5 * p.spine_r)) * np.float32(1.0 / (1.5 * p.spine_r + 8.0))
    blk = (np.sqrt(ex * ex + ey * ey) - np.float32(1.0)) * np.float32(p.spine_r + 8.0)
    sdf = np.minimum(sdf, blk)
    if heart:
        sdf = np.minimum(sdf, _heart_sdf(p, z, y, x) - 4.0)
    if with_tubes:
        for kind in ("vessel", "oesophagus", "airway"):
            for line in p.tubes[kind]:
                for (q0, r0), (q1, r1) in zip(line[:-1], line[1:], strict=True):
                    sdf = np.minimum(sdf, _capsule_sdf(z, y, x, q0, q1, r0 + 3.0, r1 + 3.0))
    return sdf


def _lung_fields(p: Patient, z, y, x, w) -> tuple[np.ndarray, np.ndarray]:
    """(sdf, lobes) at broadcastable z, y, x arrays (the slow, general path for points)."""
    a, b, yc = p.cavity(z)
    dc, _rho = _superellipse_dc(x, y - yc, a, b, np.float32(p.square), p.front_taper)
    right = x < np.float32(p.med_x)
    cap = (z - p.apex_cap(x, y, right)) * np.float32(0.8)
    dia = (p.dome(x, y, right) - z) * np.float32(0.8)
    med = _mediastinum_sdf(p, z, y, x)
    sdf = np.maximum(np.maximum(dc, cap), np.maximum(dia, -med))
    lobes = _lobes(p, z, y, x, right, sdf < 0)
    return sdf.astype(np.float32), lobes


def _seg_box(q0, q1, rad: float, Z, Y, X, edge: float):
    """Index slices of the grid axes (Z, Y, X broadcast arrays) around a segment, or None."""
    out = []
    for i, c in enumerate((Z.ravel(), Y.ravel(), X.ravel())):
        lo = min(q0[i], q1[i]) - rad - edge
        hi = max(q0[i], q1[i]) + rad + edge
        a = int(np.searchsorted(c, lo))
        b = int(np.searchsorted(c, hi, side="right"))
        if b <= a:
            return None
        out.append(slice(a, b))
    return tuple(out)


def _tubes_min(p: Patient, med, Z, Y, X, edge: float) -> None:
    """Fold the mediastinal tubes (with a fat margin) into a mediastinum sdf, box by box."""
    for kind in ("vessel", "oesophagus", "airway"):
        for line in p.tubes[kind]:
            for (q0, r0), (q1, r1) in zip(line[:-1], line[1:], strict=True):
                sl = _seg_box(q0, q1, max(r0, r1) + 3.0, Z, Y, X, edge)
                if sl is None:
                    continue
                zs, ys, xs = sl
                v = med[zs, ys, xs]
                np.minimum(
                    v, _capsule_sdf(Z[zs], Y[:, ys], X[:, :, xs], q0, q1, r0 + 3.0, r1 + 3.0), out=v
                )


def _lobes(p: Patient, z, y, x, right, lung) -> np.ndarray:
    obl = p.oblique(x, y, right)
    hor = p.horizontal(x, y)
    lob = np.where(
        right,
        np.where(z < obl, Lobe.RLL, np.where(z < hor, Lobe.RML, Lobe.RUL)),
        np.where(z < obl, Lobe.LLL, Lobe.LUL),
    ).astype(np.uint8)
    return np.where(lung, lob, 0).astype(np.uint8)


# ============================================================================ grid & acquisition


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    edge: float
    """Soft edge width (mm): the in-plane resolution, at least half a voxel."""

    @staticmethod
    def make(p: Patient, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Grid:
        centre = np.array([p.z_centre, 0.0, 0.0]) + p.offset
        axes = [
            (centre[i] + (np.arange(shape[i]) - (shape[i] - 1) / 2.0) * spacing[i]).astype(
                np.float32
            )
            for i in range(3)
        ]
        edge = max(0.75, 0.6 * max(spacing[1], spacing[2]), 0.35 * spacing[0])
        return _Grid(shape, spacing, axes[0], axes[1], axes[2], float(edge))

    def index_range(self, axis: int, lo: float, hi: float) -> tuple[int, int]:
        c = (self.z, self.y, self.x)[axis]
        s = self.spacing[axis]
        i0 = int(math.floor((lo - float(c[0])) / s))
        i1 = int(math.ceil((hi - float(c[0])) / s)) + 1
        n = self.shape[axis]
        return max(0, min(n, i0)), max(0, min(n, i1))


class _Acquisition:
    """Scanner, kernel, kVp, thickness and noise of one study (from the seed and the day)."""

    def __init__(self, p: Patient, spacing, thickness: float | None, day: int) -> None:
        r = _rng(p.seed, _TAG["acq"])
        self.vendor = VENDORS[int(r.integers(len(VENDORS)))]
        kinds = r.choice(4, p=[0.40, 0.15, 0.35, 0.10])
        self.kernel_kind = int(kinds)
        self.kernel = self.vendor["kernels"][self.kernel_kind]
        self.kvp = int(self.vendor["kvp"][int(r.integers(2))])
        self.thickness = float(spacing[0]) if thickness is None else float(thickness)
        # noise SD (HU) of soft tissue at 1 mm slices for this patient, kernel and dose
        size = p.body_half_width / 175.0
        base = r.uniform(22.0, 32.0) * size**1.5 * (120.0 / self.kvp) ** 1.2
        self.noise_1mm = float(base * self.vendor["noise"][self.kernel_kind])
        self.cutoff = KERNEL_CUTOFF[self.kernel_kind]
        dr = _rng(p.seed, _TAG["noise"], day)
        self.noise_seed = int(dr.integers(2**62))


# ============================================================================ trees


def _space_fill(
    points: np.ndarray,
    groups: np.ndarray,
    starts: np.ndarray,
    *,
    r_term: float,
    frac: float,
    n_min: int,
) -> np.ndarray:
    """Space-filling branching (after Tawhai et al.): from each start, grow towards the centroid
    of the points it supplies, split them in two by their principal axis, recurse.

    Returns segments (M, 8): z0, y0, x0, z1, y1, x1, radius, points supplied. Radius follows
    Murray's law (r^3 proportional to the points supplied); nodes supplying fewer than ``n_min``
    points are not grown (a coarse grid cannot show them), which keeps the rest identical.
    """
    order = np.argsort(groups, kind="stable")
    pts = points[order]
    counts = np.bincount(groups, minlength=len(starts))
    start = starts[counts > 0]
    n = counts[counts > 0]
    heading = np.zeros_like(start)
    segs = []
    while len(n):
        lo = np.concatenate([[0], np.cumsum(n)[:-1]])
        node_of = np.repeat(np.arange(len(n)), n)
        cent = np.add.reduceat(pts, lo, axis=0) / n[:, None]
        leaf = n <= 1
        to_c = cent - start
        dist = np.linalg.norm(to_c, axis=1, keepdims=True) + 1e-9
        # keep some of the parent's heading: branches fan out instead of zig-zagging
        head = to_c / dist + 0.6 * heading
        head /= np.linalg.norm(head, axis=1, keepdims=True) + 1e-9
        end = np.where(leaf[:, None], cent, start + head * (frac * dist))
        segs.append(np.column_stack([start, end, r_term * np.cbrt(n), n]))
        grow = (~leaf) & (n >= 2 * n_min)
        if not grow.any():
            break
        d = pts - cent[node_of]
        cov = np.add.reduceat(d[:, :, None] * d[:, None, :], lo, axis=0)
        _w, vec = np.linalg.eigh(cov)
        axis = vec[:, :, 2]
        proj = np.einsum("ij,ij->i", d, axis[node_of])
        perm = np.lexsort((proj, node_of))
        pts = pts[perm]
        keep_pt = grow[node_of]
        pts = pts[keep_pt]
        n_g = n[grow]
        half = n_g // 2
        n = np.column_stack([half, n_g - half]).ravel()
        seg_dir = end - start
        seg_dir /= np.linalg.norm(seg_dir, axis=1, keepdims=True) + 1e-9
        heading = np.repeat(seg_dir[grow], 2, axis=0)
        start = np.repeat(end[grow], 2, axis=0)
    return np.concatenate(segs, axis=0) if segs else np.zeros((0, 8))


@dataclass(frozen=True)
class _Trees:
    vessels: np.ndarray
    """(M, 8): p0 (z, y, x), p1, r0, r1 (mm)."""
    airway_outer: np.ndarray
    airway_lumen: np.ndarray


def _jittered_points(
    p: Patient, r: np.random.Generator, cell: float
) -> tuple[np.ndarray, np.ndarray]:
    """About one point per cell inside the lungs, with their lobe labels."""
    lo = np.array([p.z_bottom - 5, p.cav_yc - p.cav_b - 5, -p.cav_a - 5])
    hi = np.array([p.z_top + 5, p.cav_yc + p.cav_b + 25, p.cav_a + 5])
    counts = np.ceil((hi - lo) / cell).astype(int)
    g = np.stack(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij"), -1).reshape(-1, 3)
    pts = lo + (g + r.random(g.shape)) * cell
    sdf, lobes = p.lung_sdf_points(pts)
    keep = sdf < -1.5
    return pts[keep], lobes[keep]


def _make_trees(p: Patient, r_min: float) -> _Trees:
    """Bronchi with the arteries beside them, and veins; branches thinner than r_min are cut."""
    r = _rng(p.seed, _TAG["trees"])
    cell = 10.5 * p.s
    r_term = 0.45
    n_min = max(1, int(math.ceil((r_min / r_term) ** 3)))
    hila = p.hila
    segs = []
    airs = []
    for tree in ("bronchial", "venous"):
        pts, lobes = _jittered_points(p, r, cell)
        starts = np.zeros((6, 3))
        for lobe in Lobe:
            side = "R" if lobe in (Lobe.RUL, Lobe.RML, Lobe.RLL) else "L"
            starts[int(lobe)] = hila[side] if tree == "bronchial" else hila["v" + side]
        sg = _space_fill(pts, lobes.astype(np.int64), starts, r_term=r_term, frac=0.42, n_min=n_min)
        if tree == "venous":
            segs.append(np.column_stack([sg[:, :6], sg[:, 6] * 1.05, sg[:, 6] * 0.95]))
            continue
        # Bronchi (visible while the lumen is over ~0.8 mm) and arteries offset beside them.
        rad = sg[:, 6]
        d = sg[:, 3:6] - sg[:, 0:3]
        ln = np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
        d = d / ln
        ref = np.where(np.abs(d[:, :1]) > 0.9, [[0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]])
        off = np.cross(d, ref)
        off /= np.linalg.norm(off, axis=1, keepdims=True) + 1e-9
        lumen = 0.80 * rad
        outer = lumen + 0.12 * rad + 0.2
        is_air = lumen >= 1.2
        dist = np.where(is_air, outer + rad + 0.2, 0.0)[:, None]
        a0 = sg[:, 0:3] + off * dist
        a1 = sg[:, 3:6] + off * dist
        segs.append(np.column_stack([a0, a1, rad, rad * 0.92]))
        # join each artery segment's start to its parent's end (offsets differ between branches)
        segs.append(np.column_stack([sg[:, 0:3], a0, rad, rad]))
        airs.append((sg[is_air], lumen[is_air], outer[is_air]))
    air = airs[0]
    outer = np.column_stack([air[0][:, :6], air[2], air[2] * 0.95])
    lumen = np.column_stack([air[0][:, :6], air[1], air[1] * 0.95])
    # trachea and main bronchi
    big_o, big_l = [], []
    for line in p.tubes["airway"]:
        for (q0, r0), (q1, r1) in zip(line[:-1], line[1:], strict=True):
            big_o.append([*q0, *q1, r0, r1])
            big_l.append([*q0, *q1, r0 - 2.0, r1 - 1.8])
    vessels = np.concatenate(segs, axis=0)
    vessels = vessels[vessels[:, 6] >= r_min]
    return _Trees(
        vessels, np.concatenate([outer, np.array(big_o)]), np.concatenate([lumen, np.array(big_l)])
    )


def _draw_capsules(out: np.ndarray, grid: _Grid, segs: np.ndarray, w: float) -> None:
    """Max-composite soft tapered capsules into a uint8 occupancy array (0-255)."""
    if len(segs) == 0:
        return
    p0 = segs[:, 0:3]
    p1 = segs[:, 3:6]
    rmax = np.maximum(segs[:, 6], segs[:, 7]) + w
    lo = np.minimum(p0, p1) - rmax[:, None]
    hi = np.maximum(p0, p1) + rmax[:, None]
    axes = (grid.z, grid.y, grid.x)
    first = np.array([float(a[0]) for a in axes])
    sp = np.array(grid.spacing)
    i0 = np.clip(np.floor((lo - first) / sp).astype(int), 0, np.array(grid.shape))
    i1 = np.clip(np.ceil((hi - first) / sp).astype(int) + 1, 0, np.array(grid.shape))
    ok = np.all(i1 > i0, axis=1)
    inv_w = np.float32(1.0 / w)
    # small boxes in vectorised batches (Python overhead would dominate), large ones one by one
    small = ok & np.all(i1 - i0 <= SMALL_BOX, axis=1)
    _draw_small(out, first, sp, segs[small], i0[small], i1[small], inv_w)
    for k in np.flatnonzero(ok & ~small):
        a0, b0, c0 = i0[k]
        a1, b1, c1 = i1[k]
        q = p0[k]
        d = p1[k] - q
        l2 = float(d @ d) or 1e-9
        zz = (axes[0][a0:a1] - np.float32(q[0]))[:, None, None]
        yy = (axes[1][b0:b1] - np.float32(q[1]))[None, :, None]
        xx = (axes[2][c0:c1] - np.float32(q[2]))[None, None, :]
        dz, dy, dx = (np.float32(v) for v in d)
        t = (zz * (dz / l2) + yy * (dy / l2)) + xx * (dx / l2)
        np.clip(t, 0.0, 1.0, out=t)
        ez = zz - t * dz
        ey = yy - t * dy
        ex = xx - t * dx
        dist = np.sqrt(ez * ez + ey * ey + ex * ex)
        r0 = np.float32(segs[k, 6])
        occ = (r0 + t * np.float32(segs[k, 7] - segs[k, 6]) - dist) * inv_w + np.float32(0.5)
        np.clip(occ, 0.0, 1.0, out=occ)
        view = out[a0:a1, b0:b1, c0:c1]
        np.maximum(view, (occ * 255.0 + 0.5).astype(np.uint8), out=view)


SMALL_BOX = 8
"""Capsules whose box spans at most this many voxels per axis are drawn in batches."""


def _draw_small(
    out: np.ndarray,
    first: np.ndarray,
    sp: np.ndarray,
    segs: np.ndarray,
    i0: np.ndarray,
    i1: np.ndarray,
    inv_w: np.float32,
    chunk: int = 1024,
) -> None:
    """The same as the loop of :func:`_draw_capsules`, for many small boxes at once: every box is
    padded to the batch's largest extent, invalid voxels are dropped, and the occupancies are
    max-composited with ``np.maximum.at`` (so overlapping boxes combine exactly as in the loop)."""
    if len(segs) == 0:
        return
    order = np.lexsort(
        ((i1 - i0)[:, 2], (i1 - i0)[:, 1], (i1 - i0)[:, 0])
    )  # similar boxes together
    segs, i0, i1 = segs[order], i0[order], i1[order]
    flat_out = out.reshape(-1)
    ny, nx = out.shape[1], out.shape[2]
    f32 = np.float32
    for c0 in range(0, len(segs), chunk):
        sg = segs[c0 : c0 + chunk]
        a0 = i0[c0 : c0 + chunk]
        a1 = i1[c0 : c0 + chunk]
        ext = (a1 - a0).max(axis=0)
        offs = np.indices(tuple(int(e) for e in ext)).reshape(3, -1)
        idx = a0[:, :, None] + offs[None]
        valid = np.all(idx < a1[:, :, None], axis=1)
        c = (first[None, :, None] + idx * sp[None, :, None]).astype(np.float32)
        q = sg[:, 0:3].astype(np.float32)[:, :, None]
        d = (sg[:, 3:6] - sg[:, 0:3]).astype(np.float32)
        l2 = np.maximum((d * d).sum(axis=1), f32(1e-9))[:, None]
        rel = c - q
        t = np.einsum("mkv,mk->mv", rel, d) / l2
        np.clip(t, 0.0, 1.0, out=t)
        e = rel - t[:, None, :] * d[:, :, None]
        dist = np.sqrt(np.einsum("mkv,mkv->mv", e, e))
        r0 = sg[:, 6].astype(np.float32)[:, None]
        r1 = sg[:, 7].astype(np.float32)[:, None]
        occ = (r0 + t * (r1 - r0) - dist) * inv_w + f32(0.5)
        np.clip(occ, 0.0, 1.0, out=occ)
        v = (occ * f32(255.0) + f32(0.5)).astype(np.uint8)
        keep = valid & (v > 0)
        flat = (idx[:, 0] * ny + idx[:, 1]) * nx + idx[:, 2]
        np.maximum.at(flat_out, flat[keep], v[keep])


# ============================================================================ smooth fields


class _SmoothField:
    """A smooth random field on a lattice fixed in the patient frame, interpolated anywhere."""

    def __init__(self, r: np.random.Generator, lo, hi, step: float, channels: int = 1) -> None:
        self.lo = np.asarray(lo, dtype=np.float64)
        self.step = float(step)
        shape = tuple(int(math.ceil((b - a) / step)) + 2 for a, b in zip(lo, hi, strict=True))
        from scipy import ndimage

        raw = r.standard_normal((channels, *shape)).astype(np.float32)
        for c in range(channels):
            raw[c] = ndimage.gaussian_filter(raw[c], 1.0, mode="wrap")
            raw[c] /= raw[c].std() + 1e-6
        self.data = raw

    def sample(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """(channels, len z, len y, len x) by separable linear interpolation."""
        return _interp3(self.data, self.lo, self.step, z, y, x)


def _interp_weights(c: np.ndarray, lo: float, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    f = (np.asarray(c, dtype=np.float64) - lo) / step
    i = np.clip(np.floor(f).astype(np.int64), 0, n - 2)
    w = np.clip(f - i, 0.0, 1.0).astype(np.float32)
    return i, w


def _interp3(data: np.ndarray, lo, step, z, y, x) -> np.ndarray:
    """Separable linear interpolation of data (C, nz, ny, nx) at the grid z x y x x."""
    steps = (step, step, step) if np.isscalar(step) else step
    iz, wz = _interp_weights(z, lo[0], steps[0], data.shape[1])
    a = data[:, iz] * (1 - wz)[None, :, None, None] + data[:, iz + 1] * wz[None, :, None, None]
    iy, wy = _interp_weights(y, lo[1], steps[1], data.shape[2])
    a = a[:, :, iy] * (1 - wy)[None, None, :, None] + a[:, :, iy + 1] * wy[None, None, :, None]
    ix, wx = _interp_weights(x, lo[2], steps[2], data.shape[3])
    return a[..., ix] * (1 - wx) + a[..., ix + 1] * wx


# ============================================================================ rendering


def _soft(sdf: np.ndarray, inv_w: np.float32) -> np.ndarray:
    """1 inside (sdf < 0), 0 outside, linear over the edge width."""
    m = sdf * -inv_w
    m += np.float32(0.5)
    np.clip(m, 0.0, 1.0, out=m)
    return m


def _paint(hu: np.ndarray, m: np.ndarray, value) -> None:
    """hu := hu + m * (value - hu), in place."""
    hu += m * (value - hu)


def _slice_profile(thickness: float, step: float) -> np.ndarray:
    """Weights over neighbouring slices that turn point samples into slices of ``thickness``:
    the box of the slice convolved with linear interpolation between samples."""
    half = thickness / 2.0
    n = int(math.ceil(half / step)) + 1
    u = np.linspace(-half, half, 401)
    taps = np.arange(-n, n + 1)
    w = np.clip(1.0 - np.abs(taps[:, None] * step - u[None, :]) / step, 0.0, None).sum(1)
    w = w / w.sum()
    keep = w > 1e-4
    return w[keep], taps[keep]


def _noise_planes(
    r: np.random.Generator, ny: int, nx: int, sy: float, sx: float, cutoff: float, count: int = 8
) -> tuple[np.ndarray, float]:
    """Periodic noise planes with a CT-like power spectrum (ramp times apodisation, so the
    texture is correlated, not white), unit variance at the native resolution; also the fraction
    of the native noise power this grid can hold (coarse grids average the noise away)."""
    fy = np.fft.fftfreq(ny, sy)[:, None]
    fx = np.fft.rfftfreq(nx, sx)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    amp = np.sqrt(f * np.exp(-((f / cutoff) ** 2)))
    # native power: the same spectrum integrated in 2D up to 3 cycles/mm
    ff = np.linspace(0, 3.0, 3001)
    total = np.trapezoid(ff * ff * np.exp(-((ff / cutoff) ** 2)), ff)
    nyq = min(0.5 / sy, 0.5 / sx)
    held = np.trapezoid(np.where(ff <= nyq, ff * ff * np.exp(-((ff / cutoff) ** 2)), 0.0), ff)
    planes = np.empty((count, 2 * ny, 2 * nx), np.float32)
    for i in range(count):
        w = r.standard_normal((ny, nx))
        p = np.fft.irfft2(np.fft.rfft2(w) * amp, s=(ny, nx)).astype(np.float32)
        p /= p.std() + 1e-9
        planes[i] = np.tile(p, (2, 2))
    return planes, float(held / total)


class _Renderer:
    """Draws one phantom: trees, smooth fields and lesions first, then the anatomy slab by slab,
    then slice thickness, motion, the reconstruction circle and the conversion to int16."""

    def __init__(
        self, p: Patient, g: _Grid, acq: _Acquisition, severity: str, day: int, motion: bool
    ):
        self.p, self.g, self.acq = p, g, acq
        self.severity, self.day, self.motion = severity, day, motion
        self.inv_w = np.float32(1.0 / g.edge)

    # ------------------------------------------------------------------ driver
    def run(self) -> Phantom:
        p, g = self.p, self.g
        nz, ny, nx = g.shape
        r_min = max(0.3, 0.3 * min(g.spacing))
        trees = _make_trees(p, r_min)
        self.tree_box = self._box_of(np.concatenate([trees.vessels, trees.airway_outer]))
        bz, by, bx = self.tree_box
        shape = (bz[1] - bz[0], by[1] - by[0], bx[1] - bx[0])
        sub = _Grid(
            shape, g.spacing, g.z[bz[0] : bz[1]], g.y[by[0] : by[1]], g.x[bx[0] : bx[1]], g.edge
        )
        self.vessel = np.zeros(shape, np.uint8)
        self.wall = np.zeros(shape, np.uint8)
        self.lumen = np.zeros(shape, np.uint8)
        if min(shape) > 0:
            _draw_capsules(self.vessel, sub, trees.vessels, g.edge)
            _draw_capsules(self.wall, sub, trees.airway_outer, g.edge)
            _draw_capsules(self.lumen, sub, trees.airway_lumen, g.edge)
        tr = _rng(p.seed, _TAG["texture"])
        self.texture = _SmoothField(
            tr,
            (p.z_bottom - 250.0, -300.0, -300.0),
            (p.z_top + 250.0, 300.0, 300.0),
            9.0,
            channels=2,
        )
        self.lesion = None
        if _lesions.disease_course(p.seed, self.severity).plo_pct(self.day) > 0:
            lo = (p.z_bottom - 8.0, p.cav_yc - p.cav_b - 12.0, -p.cav_a - 12.0)
            hi = (p.z_top + 8.0, p.cav_yc + p.cav_b + 24.0, p.cav_a + 12.0)
            lat = _lesions.phantom_lattice(p.lung_sdf_grid, lo, hi)
            self.lesion = _lesions.plan(p.seed, self.severity, lat, self.day)
        self._prepare_maps()
        self._prepare_noise()
        hu = np.empty(g.shape, np.float32)
        lobes = np.zeros(g.shape, np.uint8)
        opacity = np.zeros(g.shape, np.uint8)
        slab = max(1, int(2**18 // (ny * nx)))
        for k0 in range(0, nz, slab):
            k1 = min(nz, k0 + slab)
            self._slab(k0, k1, hu[k0:k1], lobes[k0:k1], opacity[k0:k1])
        return self._finish(hu, lobes, opacity)

    def _box_of(self, segs: np.ndarray) -> tuple[tuple[int, int], ...]:
        g = self.g
        if len(segs) == 0:
            return ((0, 0), (0, 0), (0, 0))
        rmax = float(np.max(segs[:, 6:8])) + g.edge
        lo = np.minimum(segs[:, 0:3], segs[:, 3:6]).min(0) - rmax
        hi = np.maximum(segs[:, 0:3], segs[:, 3:6]).max(0) + rmax
        return tuple(g.index_range(i, lo[i], hi[i]) for i in range(3))  # type: ignore[return-value]

    def _range(self, axis: int, lo: float, hi: float) -> slice:
        a, b = self.g.index_range(axis, lo, hi)
        return slice(a, max(a, b))

    # ------------------------------------------------------------------ per-grid 2D maps
    def _prepare_maps(self) -> None:
        """In-plane maps that do not depend on z: background with the table, the boxes of the
        body and the cavity, and the lung surfaces z = f(x, y) (domes, apex caps, fissures)."""
        p, g = self.p, self.g
        f32 = np.float32
        Y = g.y[:, None]
        X = g.x[None, :]
        bg = np.full((g.shape[1], g.shape[2]), f32(AIR_HU))
        y_top = f32(self._y_back() + 3.0)
        curve = (X / f32(400.0)) ** 2 * f32(-40.0)
        pad = np.maximum(Y - (y_top + f32(5.0) + curve), (y_top + curve) - Y)
        _paint(bg, _soft(pad, self.inv_w) * f32(0.9), f32(-880.0))
        _paint(bg, _soft(np.abs(Y - (y_top + f32(6.0) + curve)) - f32(1.2), self.inv_w), f32(180.0))
        _paint(
            bg,
            _soft(np.abs(Y - (y_top + f32(42.0) + curve * f32(1.2))) - f32(1.8), self.inv_w),
            f32(260.0),
        )
        self.bg = bg
        front = p.body_yc - p.body_b - 8.0 - (50.0 if p.breast else 0.0)
        half = p.body_half_width + 8.0
        self.body_y = self._range(1, front - 5.0, self._y_back() + 2.0)
        self.body_x = self._range(2, -half, half)
        self.cav_y = self._range(1, p.cav_yc - p.cav_b - 4.0, p.cav_yc + 14.0 + p.cav_b + 4.0)
        self.cav_x = self._range(2, -p.cav_a * 1.02 - 4.0, p.cav_a * 1.02 + 4.0)
        Yc = g.y[self.cav_y][:, None]
        Xc = g.x[self.cav_x][None, :]
        right = Xc < f32(p.med_x)
        self.right = right
        self.dome2 = p.dome(Xc, Yc, right).astype(np.float32)
        self.cap2 = p.apex_cap(Xc, Yc, right).astype(np.float32)
        self.obl2 = p.oblique(Xc, Yc, right).astype(np.float32)
        self.hor2 = p.horizontal(Xc, Yc).astype(np.float32)
        sy, sx = g.spacing[1], g.spacing[2]

        def normal_factor(m: np.ndarray) -> np.ndarray:
            if min(m.shape) < 2:
                return np.ones_like(m)
            gy, gx = np.gradient(m, sy, sx)
            return (1.0 / np.sqrt(1.0 + gy * gy + gx * gx)).astype(np.float32)

        self.obl_n = normal_factor(self.obl2)
        self.hor_n = normal_factor(self.hor2)

    def _y_back(self) -> float:
        return self.p.y_back

    def _prepare_noise(self) -> None:
        g, acq = self.g, self.acq
        r = np.random.default_rng(acq.noise_seed)
        ny, nx = g.shape[1], g.shape[2]
        self.planes, held = _noise_planes(r, ny, nx, g.spacing[1], g.spacing[2], acq.cutoff)
        w, _taps = _slice_profile(acq.thickness, g.spacing[0])
        gain = float(np.sqrt(np.sum(w * w)))  # the slice profile averages independent slices
        sd = acq.noise_1mm / math.sqrt(max(acq.thickness, 0.3))
        if g.spacing[0] > acq.thickness:  # a coarse z grid averages thin slices together
            sd *= math.sqrt(acq.thickness / g.spacing[0])
        self.noise_sd = sd
        self.noise_pre = np.float32(sd * math.sqrt(held) / gain)
        nz = g.shape[0]
        self.noise_pick = r.integers(0, len(self.planes), (nz, 2))
        self.noise_off = np.stack([r.integers(0, ny, (nz, 2)), r.integers(0, nx, (nz, 2))], -1)
        ang = r.uniform(0, 2 * math.pi, nz)
        self.noise_mix = np.stack([np.cos(ang), np.sin(ang)], -1).astype(np.float32)

    # ------------------------------------------------------------------ one slab
    def _slab(self, k0: int, k1: int, hu: np.ndarray, lobes: np.ndarray, opac: np.ndarray) -> None:
        p, g, iw = self.p, self.g, self.inv_w
        f32 = np.float32
        hu[:] = self.bg
        self._hu_full = hu
        Z = g.z[k0:k1, None, None]
        yb, xb = self.body_y, self.body_x
        body = hu[:, yb, xb]
        if body.size == 0:
            self._noise(hu, k0, None)
            return
        Y = g.y[None, yb, None]
        X = g.x[None, None, xb]
        a, b, yc = p.cavity(Z)
        yp = Y - yc
        dc, rho = _superellipse_dc(X, yp, a, b, f32(p.square), p.front_taper)
        inv_rho = f32(1.0) / (rho + f32(1e-3))
        cphi = yp * inv_rho  # +1 towards the back
        sphi2 = X * inv_rho
        sphi2 *= sphi2
        tex = self._texture(k0, k1, yb, xb)
        # ---- body outline (flat back on the table), fat under the skin, muscle inside
        ab, bb, ybc = p.body(Z)
        ypb = Y - ybc
        dcb, rho_b = _superellipse_dc(X, ypb, ab, bb, f32(p.body_square), p.front_taper * 0.5)
        back = Y - f32(self._y_back())
        body_sdf = np.maximum(dcb, back)
        if p.breast:
            body_sdf = np.minimum(body_sdf, self._breast_sdf(Z, Y, X))
        mb = _soft(body_sdf, iw)
        _paint(body, mb, f32(FAT_HU) + f32(8.0) * tex[0])
        skin = _soft(np.abs(body_sdf + f32(1.0)) - f32(1.0), iw)
        skin *= mb
        _paint(body, skin, f32(25.0))
        fat = f32(p.fat) * (f32(0.8) + f32(0.5) * sphi2 - f32(0.25) * cphi)
        mm = _soft(body_sdf + fat, iw)
        _paint(body, mm, f32(MUSCLE_HU) + f32(6.0) * tex[1])
        self._ribs(body, Z, Y, X, dc, cphi)
        # ---- cavity contents (cavity box)
        cy, cx = self.cav_y, self.cav_x
        oy, ox = cy.start - yb.start, cx.start - xb.start
        ny_c, nx_c = cy.stop - cy.start, cx.stop - cx.start
        if ny_c > 0 and nx_c > 0:
            csl = (slice(None), slice(oy, oy + ny_c), slice(ox, ox + nx_c))
            cav = body[csl]
            dcc = dc[csl]
            Yc = g.y[None, cy, None]
            Xc = g.x[None, None, cx]
            texc = tex[(slice(None), *csl)]
            mc = _soft(dcc, iw)
            # above the lung tops the thoracic inlet holds muscle and vessels, not fat
            neck = np.clip((Z - self.cap2[None] + f32(8.0)) * f32(1 / 25.0), 0.0, 1.0)
            _paint(
                cav,
                mc,
                f32(FAT_HU) + f32(10.0) * texc[0] + neck * (f32(125.0) + f32(12.0) * texc[1]),
            )
            zd = self.dome2[None]
            self._abdomen(cav, Z, Yc, Xc, zd, mc, texc)
            self._mediastinum(cav, Z, Yc, Xc)
            self._spine(hu, Z, k0)
            if p.z_bottom - 5.0 <= float(g.z[k1 - 1]) and float(g.z[k0]) <= p.z_top + 5.0:
                self._lungs(
                    cav,
                    lobes[:, cy, cx],
                    opac[:, cy, cx],
                    Z,
                    Yc,
                    Xc,
                    dcc,
                    yp[:, csl[1]],
                    texc,
                    k0,
                    k1,
                )
            else:
                self._trees(hu, k0, k1)
        else:
            self._spine(hu, Z, k0)
            self._trees(hu, k0, k1)
        self._noise(hu, k0, (yb, xb, mb))

    def _texture(self, k0, k1, yb, xb) -> np.ndarray:
        """Smooth texture channels on the body box, sampled at half resolution in plane."""
        g = self.g
        ys = g.y[yb]
        xs = g.x[xb]
        t = self.texture.sample(g.z[k0:k1], ys[::2], xs[::2])
        t = np.repeat(np.repeat(t, 2, axis=2), 2, axis=3)
        return t[:, :, : len(ys), : len(xs)]

    def _lungs(self, cav, lobes, opac, Z, Yc, Xc, dcc, ypc, texc, k0, k1) -> None:
        p, iw = self.p, self.inv_w
        f32 = np.float32
        right = self.right[None]
        cap = Z - self.cap2[None]
        cap *= f32(0.8)
        dia = self.dome2[None] - Z
        dia *= f32(0.8)
        med = _mediastinum_sdf(p, Z, Yc, Xc, with_tubes=False, heart=False)
        self._heart_min(med, Z, Yc, Xc)
        self._tubes_min(med, Z, Yc, Xc)
        sdf = np.maximum(np.maximum(dcc, cap), np.maximum(dia, -med))
        lung = sdf < 0
        if not lung.any():
            self._trees(self._hu_full, k0, k1)
            return
        par = f32(LUNG_HU + p.lung_offset) + f32(p.gravity) * ypc + f32(8.0) * texc[0]
        obl = self.obl2[None]
        hor = self.hor2[None]
        below_obl = Z < obl
        lob = np.where(
            below_obl,
            np.where(right, f32(Lobe.RLL), f32(Lobe.LLL)),
            np.where(right, np.where(Z < hor, f32(Lobe.RML), f32(Lobe.RUL)), f32(Lobe.LUL)),
        )
        lobes[:] = np.where(lung, lob, f32(0)).astype(np.uint8)
        # fissures: thin denser lines, amplitude conserving the partial volume of a ~0.3 mm sheet
        width = max(self.g.edge, 0.5 * self.g.spacing[0], 0.7)
        amp = f32(min(0.9, 0.5 / width))
        d_o = (Z - obl) * self.obl_n[None]
        fis = np.exp(-((d_o * f32(1.0 / width)) ** 2) * f32(math.pi))
        d_h = (Z - hor) * self.hor_n[None]
        fh = np.exp(-((d_h * f32(1.0 / width)) ** 2) * f32(math.pi))
        fh *= right & ~below_obl
        np.maximum(fis, fh, out=fis)
        fis *= amp
        ml = _soft(sdf, iw)
        _paint(cav, ml, par + fis * (f32(-60.0) - par))
        self._trees(self._hu_full, k0, k1)
        if self.lesion is not None:
            g = self.g
            air = self._lumen_block(k0, k1)
            lab = self.lesion.apply(
                cav,
                lung,
                g.z[k0:k1],
                g.y[self.cav_y],
                g.x[self.cav_x],
                baseline=np.broadcast_to(par, cav.shape),
                air=air,
            )
            opac[:] = lab

    def _lumen_block(self, k0, k1) -> np.ndarray | None:
        """Airway lumen occupancy (0-1) over the cavity box of slices k0:k1 (air bronchograms)."""
        (bz0, bz1), (by0, by1), (bx0, bx1) = self.tree_box
        cy, cx = self.cav_y, self.cav_x
        out = np.zeros((k1 - k0, cy.stop - cy.start, cx.stop - cx.start), np.float32)
        a, b = max(k0, bz0), min(k1, bz1)
        y0, y1 = max(cy.start, by0), min(cy.stop, by1)
        x0, x1 = max(cx.start, bx0), min(cx.stop, bx1)
        if b <= a or y1 <= y0 or x1 <= x0:
            return out
        out[a - k0 : b - k0, y0 - cy.start : y1 - cy.start, x0 - cx.start : x1 - cx.start] = (
            self.lumen[a - bz0 : b - bz0, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
            * np.float32(1 / 255.0)
        )
        return out

    # ------------------------------------------------------------------ pieces
    def _breast_sdf(self, Z, Y, X):
        p = self.p
        f32 = np.float32
        s = p.breast_size
        out = None
        for side in (-1.0, 1.0):
            cz = p.z_dome_r + 55.0
            cy = p.body_yc - p.body_b + 24.0
            cx = side * 82.0 * p.s
            rz, ry, rx = 62.0 * s, 30.0 * s, 78.0 * s
            d = np.sqrt(
                ((Z - f32(cz)) / f32(rz)) ** 2
                + ((Y - f32(cy)) / f32(ry)) ** 2
                + ((X - f32(cx)) / f32(rx)) ** 2
            )
            sd = (d - f32(1.0)) * f32(ry)
            out = sd if out is None else np.minimum(out, sd)
        return out

    def _ribs(self, body, Z, Y, X, dc, cphi):
        """Ribs, costal cartilage, scapulae (on the wall band only), sternum and clavicles."""
        p, iw = self.p, self.inv_w
        f32 = np.float32
        band = (dc > f32(-2.0)) & (
            (dc < f32(16.0)) | ((dc < f32(30.0 + p.muscle)) & (cphi > f32(0.1)))
        )
        if band.any():
            idx = np.nonzero(band)
            d = dc[idx]
            c = cphi[idx]
            zb = np.broadcast_to(Z, dc.shape)[idx]
            old = body[idx]
            # ribs run level beside the spine, fall steeply at the side, level out in front
            zr = zb + f32(p.rib_drop * 0.5) * (
                f32(1.0) - np.tanh(c * f32(2.2)) * f32(1.0 / math.tanh(2.2))
            )
            u = (f32(p.z_top - 8.0) - zr) / f32(p.rib_pitch) + f32(p.rib_phase)
            k = np.floor(u)
            frac = (u - k - f32(0.5)) * f32(p.rib_pitch)
            ok = (k >= 0) & (k < 12) & (c > f32(-0.96) + k * f32(0.012))
            v = d - f32(6.0)
            rr = np.sqrt((frac * f32(1 / 5.5)) ** 2 + (v * f32(1 / 3.6)) ** 2)
            bone = (rr - f32(1.0)) * f32(3.6)
            cart = ok & (c < f32(-0.80)) & (k < 7)
            short = (k >= 9) & (c < f32(-0.3) + (k - 9) * f32(0.3))
            isrib = ok & ~cart & ~short
            mb_ = _soft(bone, iw)
            cortex = _soft(np.abs(rr - f32(0.82)) * f32(3.6) - f32(0.7), iw)
            new = old + (mb_ * isrib) * (f32(MARROW_HU) + cortex * f32(CORTEX_HU - MARROW_HU) - old)
            new += (mb_ * cart) * (f32(CARTILAGE_HU) - new)
            # scapulae: thin plates on the posterolateral ribs in the upper chest
            sc = np.abs(d - f32(20.0 + p.muscle * 0.3)) - f32(2.2)
            zwin = np.maximum(zb - f32(p.z_top - 5.0), f32(p.z_top - 150.0) - zb)
            awin = np.maximum(f32(0.15) - c, c - f32(0.78)) * f32(60.0)
            ms = _soft(np.maximum(np.maximum(sc, zwin), awin), iw)
            new += ms * (f32(600.0) - new)
            body[idx] = new
        a, b, yc = p.cavity(Z)
        zt = f32(p.z_top - 45.0)
        zb_ = f32(p.heart_c[0] - 45.0)
        if float(Z.min()) <= zt + 40.0 and float(Z.max()) >= zb_ - 5.0:
            half_w = np.where(Z > zt - f32(50.0), f32(24.0), f32(14.0)) * f32(p.s)
            ys = yc - b - f32(8.0)
            ell = (np.sqrt((X / half_w) ** 2 + ((Y - ys) * f32(1 / 6.0)) ** 2) - f32(1.0)) * f32(
                6.0
            )
            sd = np.maximum(ell, np.maximum(Z - zt, zb_ - Z))
            _paint(body, _soft(sd, iw), f32(MARROW_HU) + _soft(-(sd + f32(1.2)), iw) * f32(500.0))
        for side in (-1.0, 1.0):
            q0 = (float(zt) + 5.0, float(p.cav_yc - p.cav_b * 0.8 - 8.0), side * 22.0 * p.s)
            q1 = (float(zt) + 25.0, float(p.cav_yc - p.cav_b * 0.55), side * 135.0 * p.s)
            sl = self._seg_box(q0, q1, 8.0 * p.s, Z, Y, X)
            if sl is None:
                continue
            zs, ys_, xs = sl
            sd = _capsule_sdf(Z[zs], Y[:, ys_], X[:, :, xs], q0, q1, 7.0 * p.s, 7.5 * p.s)
            _paint(
                body[zs, ys_, xs],
                _soft(sd, iw),
                f32(MARROW_HU) + _soft(-(sd + f32(1.5)), iw) * f32(550.0),
            )

    def _abdomen(self, cav, Z, Y, X, zd, mc, tex):
        p, iw = self.p, self.inv_w
        f32 = np.float32
        if float(Z.min()) > max(p.z_dome_r, p.z_dome_l) + 5.0:
            return
        below = _soft(Z - zd, iw)
        below *= mc
        _paint(cav, below, f32(-40.0) + f32(60.0) * tex[0])
        dia = _soft(np.abs(Z - (zd - f32(2.5))) - f32(2.5), iw)
        dia *= mc
        _paint(cav, dia, f32(MUSCLE_HU))
        inner = _soft(Z - (zd - f32(5.0)), iw)
        inner *= mc
        liver_edge = X - (f32(35.0 * p.s) - f32(0.35) * (Y - f32(p.cav_yc)))
        _paint(cav, inner * _soft(liver_edge, iw), f32(LIVER_HU) + f32(4.0) * tex[1])
        st_c = (p.z_dome_l - 40.0, p.cav_yc - 12.0, 68.0 * p.s)
        d = np.sqrt(
            ((Z - f32(st_c[0])) / f32(42.0)) ** 2
            + ((Y - f32(st_c[1])) / f32(40.0)) ** 2
            + ((X - f32(st_c[2])) / f32(40.0)) ** 2
        )
        sd = (d - f32(1.0)) * f32(40.0)
        _paint(cav, _soft(sd, iw) * inner, f32(35.0))
        air = _soft(Y - f32(st_c[1] - 18.0), iw)
        _paint(cav, _soft(sd + f32(3.0), iw) * inner, f32(12.0) + air * f32(-1010.0))
        sp_c = (p.z_dome_l - 45.0, p.cav_yc + 55.0, 92.0 * p.s)
        d = np.sqrt(
            ((Z - f32(sp_c[0])) / f32(50.0)) ** 2
            + ((Y - f32(sp_c[1])) / f32(38.0)) ** 2
            + ((X - f32(sp_c[2])) / f32(24.0)) ** 2
        )
        _paint(cav, _soft((d - f32(1.0)) * f32(24.0), iw) * inner, f32(SPLEEN_HU))

    def _seg_box(self, q0, q1, rad, Z, Y, X):
        return _seg_box(q0, q1, rad, Z, Y, X, self.g.edge)

    def _tubes_min(self, med, Z, Y, X) -> None:
        _tubes_min(self.p, med, Z, Y, X, self.g.edge)

    def _heart_min(self, med, Z, Y, X) -> None:
        c = self.p.heart_c
        sl = self._seg_box(c, c, float(self.p.heart_ax.max()) + 6.0, Z, Y, X)
        if sl is None:
            return
        zs, ys, xs = sl
        v = med[zs, ys, xs]
        np.minimum(v, _heart_sdf(self.p, Z[zs], Y[:, ys], X[:, :, xs]) - np.float32(4.0), out=v)

    def _mediastinum(self, cav, Z, Y, X):
        p, iw = self.p, self.inv_w
        f32 = np.float32
        for kind, value in (("oesophagus", 38.0), ("vessel", BLOOD_HU)):
            for line in p.tubes[kind]:
                for (q0, r0), (q1, r1) in zip(line[:-1], line[1:], strict=True):
                    sl = self._seg_box(q0, q1, max(r0, r1), Z, Y, X)
                    if sl is None:
                        continue
                    zs, ys, xs = sl
                    sd = _capsule_sdf(Z[zs], Y[:, ys], X[:, :, xs], q0, q1, r0, r1)
                    _paint(cav[zs, ys, xs], _soft(sd, iw), f32(value))
        c = p.heart_c
        sl = self._seg_box(c, c, float(p.heart_ax.max()) + 2.0, Z, Y, X)
        if sl is not None:
            zs, ys, xs = sl
            sd = _heart_sdf(p, Z[zs], Y[:, ys], X[:, :, xs])
            _paint(cav[zs, ys, xs], _soft(sd, iw), f32(BLOOD_HU + 2.0))

    def _spine(self, hu, Z, k0):
        p, g, iw = self.p, self.g, self.inv_w
        f32 = np.float32
        zc = float(np.mean(Z))
        ys_c = float(p.spine_y(np.float32(zc)))
        r_max = p.spine_r * 1.3
        yr = self._range(1, ys_c - r_max - 8.0, ys_c + r_max + 60.0 * p.s)
        xr = self._range(2, -45.0 * p.s, 45.0 * p.s)
        view = hu[:, yr, xr]
        if view.size == 0:
            return
        Y = g.y[None, yr, None]
        X = g.x[None, None, xr]
        ys = p.spine_y(Z)
        r = f32(p.spine_r) * (f32(1.0) + np.clip((f32(p.z_w) - Z) / f32(400.0), 0.0, 0.3))
        period = f32(26.0 * p.s)
        ph = np.mod(Z - f32(3.0), period)
        disc = (ph < f32(5.0)).astype(np.float32)
        d = np.sqrt(X * X + (Y - ys) ** 2) - r
        body = _soft(d, iw)
        cortex = _soft(np.abs(d + f32(1.2)) - f32(1.2), iw)
        val = f32(MARROW_HU - 40.0) + cortex * f32(500.0)
        val = val * (f32(1.0) - disc) + disc * f32(85.0)
        _paint(view, body, val)
        cy = ys + r + f32(10.0)
        dr = np.sqrt(X * X + (Y - cy) ** 2)
        ring = _soft(np.abs(dr - f32(10.5)) - f32(2.8), iw) * (Y > cy - f32(6.0))
        _paint(view, ring, f32(650.0))
        _paint(view, _soft(dr - f32(7.5), iw), f32(30.0))
        spin = np.maximum(
            np.abs(X) - f32(3.5), np.maximum(cy + f32(12.0) - Y, Y - (cy + f32(30.0 * p.s)))
        )
        _paint(view, _soft(spin, iw), f32(500.0))
        trans = np.maximum(
            np.abs(Y - cy + f32(2.0)) - f32(5.0), np.abs(np.abs(X) - f32(22.0)) - f32(12.0)
        )
        trans = np.maximum(trans, np.abs(ph - f32(15.0)) - f32(8.0))
        _paint(view, _soft(trans, iw), f32(450.0))

    def _trees(self, hu, k0, k1):
        (bz0, bz1), (by0, by1), (bx0, bx1) = self.tree_box
        a = max(k0, bz0)
        b = min(k1, bz1)
        if b <= a:
            return
        f32 = np.float32
        view = hu[a - k0 : b - k0, by0:by1, bx0:bx1]
        s = f32(1.0 / 255.0)
        for occ, value in (
            (self.vessel, BLOOD_HU),
            (self.wall, AIRWAY_WALL_HU),
            (self.lumen, AIR_HU + 5.0),
        ):
            o = occ[a - bz0 : b - bz0]
            if not o.any():
                continue
            m = o.astype(np.float32)
            m *= s
            _paint(view, m, f32(value))

    def _noise(self, hu, k0, body) -> None:
        """Correlated noise: two periodic planes at random offsets, mixed, per slice; a quarter
        less outside the body (as in real scans)."""
        ny, nx = hu.shape[1], hu.shape[2]
        pre = self.noise_pre
        for i in range(hu.shape[0]):
            k = k0 + i
            (p1, p2), (o1, o2), (c1, c2) = self.noise_pick[k], self.noise_off[k], self.noise_mix[k]
            n = self.planes[p1, o1[0] : o1[0] + ny, o1[1] : o1[1] + nx] * (pre * c1)
            n += self.planes[p2, o2[0] : o2[0] + ny, o2[1] : o2[1] + nx] * (pre * c2)
            if body is None:
                hu[i] += n * np.float32(0.75)
                continue
            yb, xb, mb = body
            hu[i] += n * np.float32(0.75)
            hu[i, yb, xb] += n[yb, xb] * (mb[i] * np.float32(0.25))

    # ------------------------------------------------------------------ finishing
    def _finish(self, hu, lobes, opac) -> Phantom:
        p, g, acq = self.p, self.g, self.acq
        nz, ny, nx = g.shape
        if self.motion:
            self._apply_motion(hu, lobes, opac)
        w, taps = _slice_profile(acq.thickness, g.spacing[0])
        out = np.empty(g.shape, np.int16)
        yy = (np.arange(ny) - (ny - 1) / 2.0) * g.spacing[1]
        xx = (np.arange(nx) - (nx - 1) / 2.0) * g.spacing[2]
        radius = min(ny * g.spacing[1], nx * g.spacing[2]) / 2.0
        outside = (yy[:, None] ** 2 + xx[None, :] ** 2) > radius**2
        acc = np.empty((ny, nx), np.float32)
        for k in range(nz):
            acc.fill(0.0)
            for wt, t in zip(w, taps, strict=True):
                acc += hu[min(max(k + int(t), 0), nz - 1)] * np.float32(wt)
            np.rint(acc, out=acc)
            np.clip(acc, -1024, 3071, out=acc)
            acc[outside] = PADDING_HU
            out[k] = acc
        if outside.any():
            lobes[:, outside] = 0
            opac[:, outside] = 0
        opac[lobes == 0] = 0
        # rounded to what a DICOM decimal string holds, so the written geometry is exact
        origin = (
            round(float(g.x[0]), 6),
            round(float(g.y[0]), 6),
            round(float(g.z[0]) + p.table_z, 6),
        )
        course = _lesions.disease_course(p.seed, self.severity)
        meta = {
            "seed": p.seed,
            "severity": self.severity,
            "day": self.day,
            "days_since_onset": course.days_since_onset(self.day),
            "target_plo_pct": course.plo_pct(self.day),
            "patient_id": p.patient_id,
            "patient_sex": p.sex,
            "patient_age": p.age,
            "manufacturer": acq.vendor["manufacturer"],
            "model": acq.vendor["model"],
            "kernel": acq.kernel,
            "kvp": acq.kvp,
            "thickness": acq.thickness,
            "noise_sd": round(self.noise_sd, 2),
            "motion": self.motion,
            "lesions": 0 if self.lesion is None else len(self.lesion.lesions),
        }
        return Phantom(out, lobes, opac, tuple(float(s) for s in g.spacing), origin, meta)

    def _apply_motion(self, hu, lobes, opac) -> None:
        """Breathing during the scan: slices below the carina come from positions displaced by a
        few mm along z, changing from rotation to rotation (stepped diaphragm and vessels), with a
        faint ghost shifted front to back."""
        p, g = self.p, self.g
        r = _rng(p.seed, _TAG["motion"], self.day)
        amp = r.uniform(3.0, 7.0)
        period = r.uniform(4.0, 9.0) * g.spacing[0]
        phase = r.uniform(0, 2 * math.pi)
        ghost = int(round(r.uniform(2.0, 5.0) / g.spacing[1]))
        ks = np.flatnonzero(g.z < 0.0)
        if len(ks) == 0:
            return
        src = hu[ks].copy()
        lsrc = lobes[ks].copy()
        osrc = opac[ks].copy()
        n = len(ks)
        for i, k in enumerate(ks):
            disp = amp * math.sin(2 * math.pi * float(g.z[k]) / period + phase) / g.spacing[0]
            f = min(max(i + disp, 0.0), n - 1.0)
            i0 = int(math.floor(f))
            i1 = min(i0 + 1, n - 1)
            t = np.float32(f - i0)
            hu[k] = src[i0] * (np.float32(1.0) - t) + src[i1] * t
            j = i1 if t >= 0.5 else i0
            lobes[k] = lsrc[j]
            opac[k] = osrc[j]
            if ghost > 0:
                hu[k, ghost:] = hu[k, ghost:] * np.float32(0.88) + hu[k, :-ghost] * np.float32(0.12)
