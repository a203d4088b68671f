"""How CT-like the phantom is: HU histograms, lung figures and noise texture against real scans.

    python benchmarks/realism.py [--seeds 0 1 2] [--out out/realism]

Compared (the same masks and measures on both sides):

* HU histograms inside the lungs, subcutaneous/visceral fat, muscle and outside air: phantoms
  (severity none, on the real scans' grid) against the real normals ``covid-ct-md/normal-normal001``
  and ``normal-normal002``; distances are the Wasserstein-1 distance in HU (and the median shift);
* diseased lung: lung HU on the labelled infected slices of ``covid-P001`` and ``cap-cap001``
  against (a) phantoms with disease and (b) lesions inserted into normal002, on the slices that
  carry lesions;
* lung volume, lung HU median, vessel fraction (lung voxels above -500 HU) and the noise power
  spectrum (soft tissue, high-passed: noise SD, mean and peak frequency).

Masks: lung = the classical HU-threshold mask (``appliance.pipeline.classical.lung_mask``);
fat / muscle = body voxels outside the lungs whose 5x5 local mean lies in [-150, -50] / [20, 80]
HU (the raw HU histogram then shows the noise and texture); air = outside the body, inside the
reconstruction circle, more than 10 mm from the skin and above the table.

Writes side-by-side PNG montages into ``--out``: phantom | real normal (axial at two levels,
coronal), inserted lesions | real infected slices, phantom disease | real infected slices.
Prints JSON; the figures go into notes, never into assertions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from appliance.dicom.series import load_series
from appliance.lesions import insert_lesions
from appliance.phantom import synthesize
from appliance.pipeline.classical import lung_mask
from appliance.render import window

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "real" / "covid-ct-md"
NORMALS = ("normal-normal001", "normal-normal002")
INFECTED = ("covid-P001", "cap-cap001")
RANGES = {"lung": (-1024, 0), "fat": (-250, 50), "muscle": (-100, 200), "air": (-1100, -850)}


# ----------------------------------------------------------------------------- measures


def masks(hu: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """lung / fat / muscle / air masks (see the module docstring)."""
    small = hu[:, ::2, ::2]
    lung_s = lung_mask(small, (spacing[0], spacing[1] * 2, spacing[2] * 2))
    lung = np.repeat(np.repeat(lung_s, 2, axis=1), 2, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    body = np.zeros(hu.shape, bool)
    for k in range(hu.shape[0]):
        lab, n = ndimage.label(hu[k] > -500)
        if n:
            sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
            body[k] = ndimage.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))
    local = ndimage.uniform_filter(hu.astype(np.float32), size=(1, 5, 5))
    lung_d = ndimage.binary_dilation(lung, iterations=3)
    inner = ndimage.binary_erosion(body, iterations=3) & ~lung_d
    fat = inner & (local > -150) & (local < -50)
    muscle = inner & (local > 20) & (local < 80)
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    circle = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 < (0.46 * min(ny, nx)) ** 2
    far = ~ndimage.binary_dilation(body, iterations=max(1, int(10 / spacing[1])))
    air = far & circle[None] & (hu > -1020)
    # drop the table and everything below the body's lowest row
    rows = np.nonzero(body.any(axis=(0, 2)))[0]
    if len(rows):
        air[:, rows.max() :, :] = False
    return {"lung": lung, "fat": fat, "muscle": muscle, "air": air}


def histogram(values: np.ndarray, rng: tuple[int, int]) -> np.ndarray:
    h, _ = np.histogram(values, bins=rng[1] - rng[0], range=rng)
    return h / max(h.sum(), 1)


def w1(h1: np.ndarray, h2: np.ndarray) -> float:
    """Wasserstein-1 distance (HU) between two normalised 1-HU-bin histograms."""
    return float(np.abs(np.cumsum(h1) - np.cumsum(h2)).sum())


def nps(hu: np.ndarray, muscle: np.ndarray, px: float, patch: int = 32) -> dict:
    """Noise power spectrum of soft tissue: high-passed patches fully inside the muscle mask."""
    spectra = []
    for k in range(0, hu.shape[0], max(1, hu.shape[0] // 40)):
        m = ndimage.binary_erosion(muscle[k], iterations=2)
        if m.sum() < patch * patch:
            continue
        sl = hu[k].astype(np.float64)
        hp = sl - ndimage.uniform_filter(sl, 9)
        for y in range(0, sl.shape[0] - patch, patch // 2):
            for x in range(0, sl.shape[1] - patch, patch // 2):
                if m[y : y + patch, x : x + patch].all():
                    p = hp[y : y + patch, x : x + patch]
                    p = p - p.mean()
                    spectra.append(np.abs(np.fft.fft2(p)) ** 2 * px * px / (patch * patch))
    if not spectra:
        return {"patches": 0}
    s = np.mean(spectra, axis=0)
    f = np.fft.fftfreq(patch, px)
    fr = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    bins = np.linspace(0, fr.max(), 17)
    idx = np.digitize(fr.ravel(), bins) - 1
    radial = np.bincount(idx, weights=s.ravel(), minlength=len(bins))[: len(bins) - 1]
    counts = np.bincount(idx, minlength=len(bins))[: len(bins) - 1]
    radial = radial / np.maximum(counts, 1)
    centres = 0.5 * (bins[1:] + bins[:-1])
    sd = float(np.sqrt(s.sum() / (patch * patch * px * px)))
    return {
        "patches": len(spectra),
        "noise_sd_hu": round(sd, 2),
        "mean_freq_per_mm": round(float((fr * s).sum() / s.sum()), 3),
        "peak_freq_per_mm": round(float(centres[int(np.argmax(radial))]), 3),
        "radial": [round(float(v), 3) for v in radial],
    }


def figures(hu: np.ndarray, spacing, m: dict[str, np.ndarray]) -> dict:
    lung = m["lung"]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    vals = hu[lung]
    return {
        "lung_ml": round(float(lung.sum() * voxel_ml), 1),
        "lung_hu_median": float(np.median(vals)),
        "lung_hu_p05_p95": [float(v) for v in np.percentile(vals, [5, 95])],
        "vessel_fraction": round(float(np.mean(vals > -500)), 4),
        "fat_hu_median": float(np.median(hu[m["fat"]])) if m["fat"].any() else None,
        "muscle_hu_median": float(np.median(hu[m["muscle"]])) if m["muscle"].any() else None,
        "nps": nps(hu, m["muscle"], spacing[1]),
    }


# ----------------------------------------------------------------------------- data


def load(name: str):
    vol, info = load_series(REAL / name)
    return vol.array, vol.spacing, info


def infected_slices(name: str, info) -> np.ndarray:
    """Axis-0 indices of the slices labelled infected (per-slice CSV, matched by file name)."""
    path = REAL / "labels" / f"{name}_labels.csv"
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    bad = {r["file"] for r in rows if r["infection"] == "1"}
    return np.array([k for k, f in enumerate(info.files) if os.path.basename(f) in bad], dtype=int)


# ----------------------------------------------------------------------------- montages


def _label(img: np.ndarray, text: str) -> Image.Image:
    im = Image.fromarray(img).convert("RGB")
    ImageDraw.Draw(im).text((6, 4), text, fill=(255, 255, 0))
    return im


def _row(images: list[Image.Image], height: int = 384) -> Image.Image:
    scaled = [im.resize((max(1, int(im.width * height / im.height)), height)) for im in images]
    out = Image.new("RGB", (sum(i.width for i in scaled), height))
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.width
    return out


def _stack(rows: list[Image.Image]) -> Image.Image:
    w = max(r.width for r in rows)
    out = Image.new("RGB", (w, sum(r.height for r in rows)))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def _level(lung: np.ndarray, frac: float) -> int:
    zs = np.nonzero(lung.any(axis=(1, 2)))[0]
    return int(zs.min() + frac * (zs.max() - zs.min()))


def _coronal(hu: np.ndarray, spacing, lung: np.ndarray) -> np.ndarray:
    ys = np.nonzero(lung.any(axis=(0, 2)))[0]
    row = int(ys.min() + 0.45 * (ys.max() - ys.min()))
    img = window(hu[::-1, row, :])
    h = int(round(img.shape[0] * spacing[0] / spacing[2]))
    return np.array(Image.fromarray(img).resize((img.shape[1], h)))


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "out" / "realism"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "inputs": {
            "normals": list(NORMALS),
            "infected": list(INFECTED),
            "phantom_seeds": args.seeds,
        },
    }
    real = {}
    for name in (*NORMALS, *INFECTED):
        hu, spacing, info = load(name)
        real[name] = (hu, spacing, info, masks(hu, spacing))
    # phantoms on the grid of normal002 (2 mm slices, 512 x 512)
    n2_hu, n2_sp, _n2_info, n2_m = real["normal-normal002"]
    grid = {"spacing": (2.0, 0.7, 0.7), "shape": (170, 512, 512), "thickness": 2.0}
    phantoms = {}
    for seed in args.seeds:
        p = synthesize(seed, "none", **grid)
        phantoms[seed] = (p.hu, p.spacing, p, masks(p.hu, p.spacing))
    # ---- tissue histograms
    hists: dict[str, dict] = {}
    for tissue, rng in RANGES.items():
        ph_h = histogram(np.concatenate([v[0][v[3][tissue]] for v in phantoms.values()]), rng)
        entry = {}
        for name in NORMALS:
            hu, _sp, _info, m = real[name]
            rh = histogram(hu[m[tissue]], rng)
            entry[f"phantom_vs_{name}"] = round(w1(ph_h, rh), 2)
            centres = np.arange(rng[0], rng[1]) + 0.5
            shift = float(
                np.interp(0.5, np.cumsum(ph_h), centres) - np.interp(0.5, np.cumsum(rh), centres)
            )
            entry[f"median_shift_vs_{name}"] = round(shift, 1)
        rh1 = histogram(real[NORMALS[0]][0][real[NORMALS[0]][3][tissue]], rng)
        rh2 = histogram(real[NORMALS[1]][0][real[NORMALS[1]][3][tissue]], rng)
        entry["real_vs_real"] = round(w1(rh1, rh2), 2)
        hists[tissue] = entry
    report["tissue_hu_w1"] = hists
    report["figures"] = {
        **{name: figures(real[name][0], real[name][1], real[name][3]) for name in NORMALS},
        **{f"phantom_seed{s}": figures(v[0], v[1], v[3]) for s, v in phantoms.items()},
    }
    for s, v in phantoms.items():
        report["figures"][f"phantom_seed{s}"]["truth_lung_ml"] = round(
            float((v[2].lobes > 0).sum() * np.prod(v[1]) / 1000.0), 1
        )
    # ---- diseased lung
    disease: dict[str, dict] = {}
    infected_h = {}
    for name in INFECTED:
        hu, _sp, info, m = real[name]
        ks = infected_slices(name, info)
        infected_h[name] = histogram(hu[ks][m["lung"][ks]], RANGES["lung"])
        disease[name] = {
            "infected_slices": int(len(ks)),
            "lung_hu_median_infected": float(np.median(hu[ks][m["lung"][ks]])),
        }
    sick = {}
    for seed, sev in ((args.seeds[0], "moderate"), (args.seeds[-1], "severe")):
        p = synthesize(seed, sev, **grid)
        ks = np.nonzero(p.opacity.any(axis=(1, 2)))[0]
        lm = p.lobes[ks] > 0
        sick[sev] = (p, ks)
        h = histogram(p.hu[ks][lm], RANGES["lung"])
        disease[f"phantom_{sev}"] = {
            "plo_pct": round(100.0 * float((p.opacity > 0).sum() / (p.lobes > 0).sum()), 2),
            "lung_hu_median_lesion_slices": float(np.median(p.hu[ks][lm])),
            "ggo_hu_median": float(np.median(p.hu[p.opacity == 1]))
            if (p.opacity == 1).any()
            else None,
            "consolidation_hu_median": float(np.median(p.hu[p.opacity == 2]))
            if (p.opacity == 2).any()
            else None,
            **{f"w1_vs_{name}": round(w1(h, infected_h[name]), 2) for name in INFECTED},
        }
    lung2 = n2_m["lung"]
    ins_hu, ins_lab = insert_lesions(n2_hu, lung2, n2_sp, seed=args.seeds[0], severity="severe")
    ks = np.nonzero(ins_lab.any(axis=(1, 2)))[0]
    h = histogram(ins_hu[ks][lung2[ks]], RANGES["lung"])
    disease["inserted_into_normal002_severe"] = {
        "plo_pct": round(100.0 * float((ins_lab > 0).sum() / lung2.sum()), 2),
        "lung_hu_median_lesion_slices": float(np.median(ins_hu[ks][lung2[ks]])),
        "ggo_hu_median": float(np.median(ins_hu[ins_lab == 1])) if (ins_lab == 1).any() else None,
        "consolidation_hu_median": float(np.median(ins_hu[ins_lab == 2]))
        if (ins_lab == 2).any()
        else None,
        **{f"w1_vs_{name}": round(w1(h, infected_h[name]), 2) for name in INFECTED},
    }
    report["diseased_lung"] = disease
    # ---- montages
    p0_hu, p0_sp, p0, p0_m = phantoms[args.seeds[0]]
    rows = []
    for frac in (0.75, 0.55, 0.3):
        kp, kr = _level(p0.lobes > 0, frac), _level(lung2, frac)
        rows.append(
            _row(
                [
                    _label(
                        window(p0_hu[kp]), f"phantom seed {args.seeds[0]} ({frac:.0%} lung height)"
                    ),
                    _label(window(n2_hu[kr]), "real normal002"),
                ]
            )
        )
    _stack(rows).save(out / "phantom_vs_normal_axial.png")
    _row(
        [
            _label(_coronal(p0_hu, p0_sp, p0.lobes > 0), "phantom coronal"),
            _label(_coronal(n2_hu, n2_sp, lung2), "real normal002 coronal"),
        ],
        512,
    ).save(out / "phantom_vs_normal_coronal.png")
    rows = []
    p_hu, p_sp, _p_info, p_m = real["covid-P001"]
    c_hu, _c_sp, _c_info, _c_m = real["cap-cap001"]
    kp_inf = infected_slices("covid-P001", real["covid-P001"][2])
    kc_inf = infected_slices("cap-cap001", real["cap-cap001"][2])
    ins_ks = np.argsort((ins_lab > 0).sum(axis=(1, 2)))[::-1]
    for i, frac in enumerate((0.3, 0.7)):
        ki = int(ins_ks[i * 7])
        kp = int(kp_inf[int(frac * (len(kp_inf) - 1))])
        kc = int(kc_inf[int(frac * (len(kc_inf) - 1))])
        rows.append(
            _row(
                [
                    _label(window(ins_hu[ki]), f"normal002 + inserted lesions (slice {ki})"),
                    _label(window(p_hu[kp]), f"real COVID P001 infected slice {kp}"),
                    _label(window(c_hu[kc]), f"real CAP cap001 infected slice {kc}"),
                ]
            )
        )
    _stack(rows).save(out / "inserted_vs_infected.png")
    rows = []
    for sev, (p, ks) in sick.items():
        k = int(ks[np.argmax((p.opacity[ks] > 0).sum(axis=(1, 2)))])
        kp = int(kp_inf[len(kp_inf) // 2])
        rows.append(
            _row(
                [
                    _label(window(p.hu[k]), f"phantom {sev} slice {k}"),
                    _label(window(p_hu[kp]), f"real COVID P001 slice {kp}"),
                ]
            )
        )
    _stack(rows).save(out / "phantom_disease_vs_infected.png")
    report["montages"] = sorted(
        str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in out.glob("*.png")
    )
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
