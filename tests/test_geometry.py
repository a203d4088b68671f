"""Geometry: exact reorientation for all 48 axis orders, boxes, resampling to a model grid and
back (against brute-force references), one voxel-centre convention both ways."""

import itertools

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from appliance.pipeline.geometry import (
    Grid,
    Reorientation,
    bounding_box,
    labels_from_probabilities,
    make_grid,
    members,
    resample_image,
    to_canonical,
)
from appliance.volume import CANONICAL_DIRECTION, Volume

ORIENTATIONS = [(p, f) for p in itertools.permutations(range(3))
                for f in itertools.product((False, True), repeat=3)]


def scan_of(perm, flip, rng, tilt_deg=2.0, shape=(4, 5, 6)) -> Volume:
    """A volume whose array axes are the canonical axes permuted and flipped, then rotated by a
    random small angle (as a real scan is never exactly aligned)."""
    direction = np.zeros((3, 3))
    for k in range(3):
        direction[perm[k]] = CANONICAL_DIRECTION[k] * (-1.0 if flip[k] else 1.0)
    axis = rng.normal(size=3)
    angle = np.radians(tilt_deg) * rng.uniform()
    wobble = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle)
    direction = wobble.apply(direction)
    array = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    spacing = tuple(rng.uniform(0.5, 3.0, 3))
    origin = tuple(rng.uniform(-200, 200, 3))
    return Volume(array, spacing, origin, direction)


def positions(volume: Volume, index: np.ndarray) -> np.ndarray:
    """Patient positions of integer voxel indices (N, 3)."""
    return np.asarray(volume.origin) + (index * np.asarray(volume.spacing)) @ volume.direction


# ----------------------------------------------------------------------------- reorientation


@pytest.mark.parametrize(("perm", "flip"), ORIENTATIONS, ids=[f"{p}{f}" for p, f in ORIENTATIONS])
def test_to_canonical_and_undo_round_trip_for_every_axis_order(perm, flip):
    rng = np.random.default_rng(abs(hash((perm, flip))) % 2**32)
    volume = scan_of(perm, flip, rng)
    canonical, reo = to_canonical(volume)
    assert reo.perm == perm and reo.flip == flip
    assert canonical.shape == tuple(volume.shape[p] for p in perm)
    # every canonical axis points (within the wobble) where the canonical orientation says
    cosines = np.sum(canonical.direction * CANONICAL_DIRECTION, axis=1)
    assert cosines.min() > np.cos(np.radians(2.01))
    # every voxel keeps its value and its place in the patient
    index = np.argwhere(np.ones(canonical.shape, bool))
    scan_index = np.argwhere(np.ones(volume.shape, bool))[canonical.array[tuple(index.T)]]
    np.testing.assert_allclose(positions(canonical, index), positions(volume, scan_index),
                               atol=1e-9)
    # exact inverse, also with a leading channel axis and for labels
    np.testing.assert_array_equal(reo.undo(canonical.array), volume.array)
    stacked = np.stack([volume.array, -volume.array])
    np.testing.assert_array_equal(reo.apply(stacked)[1], -canonical.array)
    np.testing.assert_array_equal(reo.undo(reo.apply(stacked)), stacked)
    assert reo.undo(canonical.array).flags.c_contiguous


def test_canonical_scan_is_left_alone():
    volume = Volume(np.zeros((3, 4, 5), np.int16), (2.0, 0.7, 0.7), (1.0, 2.0, 3.0))
    canonical, reo = to_canonical(volume)
    assert reo.is_identity and canonical.array is volume.array
    assert canonical.origin == volume.origin and canonical.spacing == volume.spacing


def test_reorientation_refuses_arrays_of_another_shape():
    volume = scan_of((2, 0, 1), (True, False, False), np.random.default_rng(0))
    _, reo = to_canonical(volume)
    with pytest.raises(ValueError, match=r"`array` must have the scan grid's shape \(4, 5, 6\)"):
        reo.apply(np.zeros((5, 4, 6)))
    with pytest.raises(ValueError, match=r"must have the canonical grid's shape \(6, 4, 5\)"):
        reo.undo(np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match=r"`array` must be 3D or 4D"):
        reo.apply(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"`perm` must be a permutation"):
        Reorientation((0, 0, 1))


def test_to_canonical_refuses_obliques_and_degenerate_directions():
    rng = np.random.default_rng(1)
    oblique = scan_of((0, 1, 2), (False, False, False), rng, tilt_deg=0.0)
    tilted = Rotation.from_euler("x", 20, degrees=True).apply(oblique.direction)
    with pytest.raises(ValueError, match=r"oblique scan: an image axis lies 20.0 degrees"):
        to_canonical(Volume(oblique.array, oblique.spacing, oblique.origin, tilted))
    to_canonical(Volume(oblique.array, oblique.spacing, oblique.origin, tilted), max_oblique_deg=25)
    twice_z = np.array([[0, 0, 1.0], [0, 0, 1.0], [1.0, 0, 0]])
    with pytest.raises(ValueError, match=r"`volume.direction` must map the array axes onto"):
        to_canonical(Volume(oblique.array, oblique.spacing, direction=twice_z))


# ----------------------------------------------------------------------------- boxes


def test_bounding_box_with_margins_clipped_at_the_edges():
    mask = np.zeros((10, 12, 14), bool)
    mask[1, 5, 12] = mask[3, 7, 9] = True
    assert bounding_box(mask) == (slice(1, 4), slice(5, 8), slice(9, 13))
    assert bounding_box(mask, margin=(2, 1, 3)) == (slice(0, 6), slice(4, 9), slice(6, 14))
    assert bounding_box(mask, margin=100) == (slice(0, 10), slice(0, 12), slice(0, 14))
    assert bounding_box(mask.astype(np.uint8)) == bounding_box(mask)
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None
    with pytest.raises(ValueError, match=r"`margin` must be three integers >= 0, got \(1, -1, 0\)"):
        bounding_box(mask, margin=(1, -1, 0))
    with pytest.raises(ValueError, match=r"`mask` must be a 3D numpy array"):
        bounding_box(np.ones((3, 3), bool))


def test_bounding_box_matches_find_objects_on_random_masks():
    rng = np.random.default_rng(2)
    for _ in range(20):
        mask = rng.random((9, 11, 13)) > 0.995
        if not mask.any():
            continue
        expected = ndimage.find_objects(mask.astype(np.uint8))[0]
        assert bounding_box(mask) == expected


# ----------------------------------------------------------------------------- model grids


def test_make_grid_rounds_the_extent_and_checks_its_arguments():
    box = (slice(10, 310), slice(0, 512), slice(3, 500))
    grid = make_grid(box, (1.0, 0.68, 0.68), (3.0, 3.0, 3.0))
    assert grid.shape == (100, round(512 * 0.68 / 3), round(497 * 0.68 / 3))
    assert grid.box_shape == (300, 512, 497)
    first_two = [10 + 0.5 * 3 - 0.5, 10 + 1.5 * 3 - 0.5]  # box.start + (i + 0.5) * r - 0.5
    np.testing.assert_allclose(grid.scan_coordinates(0)[:2], first_two)
    assert make_grid((slice(0, 1),) * 3, (1, 1, 1), (5, 5, 5)).shape == (1, 1, 1)
    with pytest.raises(ValueError, match=r"`box` must be unit-step slices with 0 <= start < stop"):
        make_grid((slice(5, 5), slice(0, 3), slice(0, 3)), (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match=r"`box` must be three slices"):
        make_grid((slice(0, 5),), (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match=r"`dst_spacing` must be three positive numbers, got \(1"):
        make_grid((slice(0, 5),) * 3, (1, 1, 1), (1, 0, 1))


def tent_weight_matrix(grid: Grid, axis: int, n: int) -> np.ndarray:
    """Brute-force reference for one axis: the linear interpolant averaged (by numerical
    integration) over sqrt(r^2 - 1) scan voxels around each model voxel centre; clamped edges."""
    r = grid.ratio[axis]
    b = np.sqrt(max(r * r - 1, 0))
    w = np.zeros((grid.shape[axis], n))
    for i, c in enumerate(grid.scan_coordinates(axis)):
        xs = np.array([c]) if b == 0 else c + np.linspace(-b / 2, b / 2, 4001)
        for j in range(int(np.floor(xs.min())) - 1, int(np.ceil(xs.max())) + 2):
            tent = np.clip(1 - np.abs(xs - j), 0, None)
            value = tent.mean() if b == 0 else np.trapezoid(tent, xs) / b
            w[i, min(max(j, 0), n - 1)] += value
    return w


@pytest.mark.parametrize(
    ("src", "dst"),
    [((1.0, 0.68, 0.68), (3.0, 3.0, 3.0)),  # downsampling, mixing planes first
     ((5.0, 0.7, 0.8), (1.5, 1.5, 0.8)),  # upsampling along axis 0: in-plane first
     ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))],  # identity
)
def test_resample_image_matches_a_brute_force_reference(src, dst):
    rng = np.random.default_rng(3)
    image = rng.integers(-1000, 1000, size=(17, 23, 19)).astype(np.int16)
    grid = make_grid((slice(2, 15), slice(0, 23), slice(4, 17)), src, dst)
    expected = image.astype(float)
    for axis in range(3):
        w = tent_weight_matrix(grid, axis, image.shape[axis])
        expected = np.moveaxis(np.tensordot(w, expected, axes=([1], [axis])), 0, axis)
    out = resample_image(image, grid)
    assert out.shape == grid.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-3 * 1000)
    if src == dst:
        np.testing.assert_array_equal(out, image[grid.box])


@pytest.mark.parametrize("dst", [(3.0, 3.0, 3.0), (1.3, 2.2, 0.4), (0.5, 0.5, 0.5)])
def test_resample_image_of_a_linear_ramp_is_exact_in_the_interior(dst):
    src = (1.0, 0.7, 0.7)
    shape = (40, 60, 50)
    idx = np.indices(shape, dtype=float)
    ramp = 3.0 + 2.0 * idx[0] - 0.5 * idx[1] + 1.25 * idx[2]
    box = (slice(10, 30), slice(15, 45), slice(12, 38))  # the kernels stay inside the array
    grid = make_grid(box, src, dst)
    c = np.meshgrid(*[grid.scan_coordinates(a) for a in range(3)], indexing="ij")
    expected = 3.0 + 2.0 * c[0] - 0.5 * c[1] + 1.25 * c[2]
    np.testing.assert_allclose(resample_image(ramp, grid), expected, atol=1e-3)


def test_resample_image_anti_aliases_when_downsampling():
    """Stripes one scan voxel wide (the highest frequency) must not alias into the model grid:
    plain linear interpolation would keep amplitude 1 at some model voxels."""
    stripes = np.where(np.indices((20, 64, 64))[2] % 2 == 0, 1.0, -1.0)
    grid = make_grid((slice(0, 20), slice(0, 64), slice(0, 64)), (1, 0.68, 0.68), (1, 3.0, 3.0))
    out = resample_image(stripes, grid)
    assert np.abs(out[:, 2:-2, 2:-2]).max() < 0.1
    nearest = resample_image(stripes, grid, order=0)
    assert np.abs(nearest).min() == 1.0  # order 0 picks voxels: values stay labels


def test_resample_image_arguments():
    grid = make_grid((slice(0, 10),) * 3, (1, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match=r"`order` must be 0 \(nearest\) or 1 \(linear\), got 3"):
        resample_image(np.zeros((10, 10, 10)), grid, order=3)
    with pytest.raises(ValueError, match=r"`image.shape` must contain the grid's box"):
        resample_image(np.zeros((10, 9, 10)), grid)
    with pytest.raises(TypeError, match=r"`image` must have a real numeric dtype, got complex128"):
        resample_image(np.zeros((10, 10, 10), complex), grid)


# ----------------------------------------------------------------------------- back to the scan


def smooth_probabilities(shape, n_classes, rng, sigma=1.0, noise=0.0) -> np.ndarray:
    logits = ndimage.gaussian_filter(rng.normal(size=(n_classes,) + shape), (0,) + (sigma,) * 3)
    logits = logits * 6 + noise * rng.normal(size=logits.shape)
    p = np.exp(logits - logits.max(axis=0))
    return (p / p.sum(axis=0)).astype(np.float32)


def brute_force_labels(probs, grid, out_shape) -> np.ndarray:
    """Every class trilinearly upsampled onto the scan grid (clamped edges), then argmax."""
    coords = np.meshgrid(*[grid.model_coordinates(a) for a in range(3)], indexing="ij")
    up = np.stack([ndimage.map_coordinates(p.astype(float), coords, order=1, mode="nearest")
                   for p in probs])
    out = np.zeros(out_shape, np.uint8)
    out[grid.box] = up.argmax(axis=0)
    return out


@pytest.mark.parametrize(
    ("src", "dst", "noise"),
    [((1.0, 0.7, 0.7), (3.0, 2.5, 2.5), 0.0),
     ((1.0, 0.7, 0.7), (3.0, 2.5, 2.5), 3.0),  # noisy: most cells mixed
     ((2.5, 0.9, 0.6), (1.0, 1.0, 1.0), 0.0),  # model finer than the scan along axis 0
     ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 1.0)],
)
def test_labels_from_probabilities_equals_brute_force(src, dst, noise):
    rng = np.random.default_rng(4)
    out_shape = (31, 47, 53)
    grid = make_grid((slice(3, 29), slice(0, 47), slice(5, 50)), src, dst)
    probs = smooth_probabilities(grid.shape, 6, rng, noise=noise)
    labels = labels_from_probabilities(probs, grid, out_shape)
    expected = brute_force_labels(probs, grid, out_shape)
    assert labels.dtype == np.uint8 and labels.shape == out_shape
    assert np.mean(labels == expected) > 0.9999  # only exact ties may differ
    outside = np.ones(out_shape, bool)
    outside[grid.box] = False
    assert not labels[outside].any()
    assert len(np.unique(labels[grid.box])) == 6


def test_labels_from_probabilities_single_voxel_axis_and_arguments():
    rng = np.random.default_rng(5)
    grid = make_grid((slice(0, 2), slice(0, 20), slice(0, 20)), (1, 1, 1), (5, 3, 3))
    assert grid.shape[0] == 1
    probs = smooth_probabilities(grid.shape, 3, rng)
    np.testing.assert_array_equal(labels_from_probabilities(probs, grid, (2, 20, 20)),
                                  brute_force_labels(probs, grid, (2, 20, 20)))
    with pytest.raises(ValueError, match=r"`probs` must have shape \(C, \(1, 7, 7\)\)"):
        labels_from_probabilities(probs[:, :, :6], grid, (2, 20, 20))
    with pytest.raises(ValueError, match=r"`out_shape` must contain the grid's box"):
        labels_from_probabilities(probs, grid, (2, 19, 20))


def test_round_trip_through_a_model_grid_lands_on_the_same_place():
    """Scan labels -> one-hot -> resample_image -> labels_from_probabilities: same objects, same
    centroids (a half-voxel slip in either direction would move them by about 0.5 scan voxel)."""
    out_shape = (40, 90, 80)
    spacing, model = (2.0, 0.7, 0.7), (1.5, 1.6, 1.6)
    mm = np.indices(out_shape, dtype=float) * np.reshape(spacing, (3, 1, 1, 1))
    labels = np.zeros(out_shape, np.uint8)
    for label, centre, radius in ((1, (36, 28, 21), 15), (2, (50, 38.5, 36.4), 12)):
        distance2 = sum((mm[a] - centre[a]) ** 2 for a in range(3))
        labels[distance2 < radius**2] = label
    box = bounding_box(labels > 0, margin=(3, 8, 8))
    grid = make_grid(box, spacing, model)
    probs = np.stack([resample_image((labels == c).astype(np.float32), grid) for c in range(3)])
    back = labels_from_probabilities(probs, grid, out_shape)
    for c in (1, 2):
        a, b = labels == c, back == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
        np.testing.assert_allclose(ndimage.center_of_mass(b), ndimage.center_of_mass(a), atol=0.15)


@pytest.mark.slow
def test_labels_from_probabilities_at_full_scan_size_agrees_on_a_slab():
    """(6, 100, 120, 120) -> (300, 512, 512); brute force checked on a slab of scan planes."""
    rng = np.random.default_rng(6)
    out_shape = (300, 512, 512)
    box = (slice(0, 300), slice(0, 512), slice(0, 512))
    grid = make_grid(box, (1.0, 0.68, 0.68), (3.0, 2.9, 2.9))
    assert grid.shape == (100, 120, 120)
    probs = smooth_probabilities(grid.shape, 6, rng, sigma=2.0)
    labels = labels_from_probabilities(probs, grid, out_shape)
    slab = make_grid((slice(120, 135),) + box[1:], grid.src_spacing, grid.dst_spacing)
    # the slab's scan planes sit at the same model coordinates as in the full grid
    u = grid.model_coordinates(0)[120:135]
    coords = np.meshgrid(u, slab.model_coordinates(1), slab.model_coordinates(2), indexing="ij")
    up = np.stack([ndimage.map_coordinates(p, coords, order=1, mode="nearest") for p in probs])
    assert np.mean(labels[120:135] == up.argmax(axis=0)) > 0.9999


def test_members_matches_isin():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 40, size=(7, 9, 11)).astype(np.uint32)
    for ids in ([], [0], [5, 39], np.array([3, 3, 17]), [50]):
        expected = np.isin(labels, ids)
        assert np.array_equal(members(labels, ids), expected)
        assert np.array_equal(members(labels, ids, n_labels=40), expected)
