"""Tests of the training/export code (export/): network shapes, data orientation, training
resume, ONNX export parity and the fp16 variant. CPU only and small: tiny tiles, tiny networks.

`toy_phantom` is a test double for appliance.phantom.synthesize (named as one): two ellipsoid
lungs split into lobes, with blobs of ground glass and consolidation. It only has to be cheap and
anatomically oriented (right lung at LOW column indices), not realistic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export import data as D  # noqa: E402
from export.unet import UNet3D, UNetConfig, check_tile_shape  # noqa: E402

SMALL_LOBES = replace(D.STAGES["lobes"], tile_shape=(32, 32, 32))
SMALL_OPACITY = replace(D.STAGES["opacity"], tile_shape=(16, 32, 32), synth_shape=(40, 56, 56))


@dataclass
class ToyPhantom:
    """Stand-in for appliance.phantom.Phantom (same field names)."""

    hu: np.ndarray
    lobes: np.ndarray
    opacity: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    meta: dict = field(default_factory=dict)


def toy_phantom(seed: int, severity: str = "moderate", *, spacing=(1.0, 0.7, 0.7),
                shape=(300, 512, 512), thickness=None, day=0, motion=False) -> ToyPhantom:
    """Test double of synthesize(): a body cylinder, right lung (RUL/RML/RLL) at low columns,
    left lung (LUL/LLL) at high columns, opacity blobs inside the lungs by severity."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape], indexing="ij")
    off = rng.uniform(-0.05, 0.05, 3)
    z, y, x = z - off[0], y - off[1], x - off[2]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (y / 0.7) ** 2 + (x / 0.9) ** 2 < 1
    hu[body] = 40.0
    right = ((z / 0.7) ** 2 + (y / 0.5) ** 2 + ((x + 0.42) / 0.32) ** 2) < 1
    left = ((z / 0.7) ** 2 + (y / 0.5) ** 2 + ((x - 0.42) / 0.28) ** 2) < 1
    lobes = np.zeros(shape, dtype=np.uint8)
    lobes[right & (z > 0.2)] = 1
    lobes[right & (z <= 0.2) & (y < 0)] = 2
    lobes[right & (z <= 0.2) & (y >= 0)] = 3
    lobes[left & (z > 0.0)] = 4
    lobes[left & (z <= 0.0)] = 5
    lung = lobes > 0
    hu[lung] = -850.0
    opacity = np.zeros(shape, dtype=np.uint8)
    n_blobs = {"none": 0, "mild": 1, "moderate": 2, "severe": 4, "critical": 6}[severity]
    lung_idx = np.argwhere(lung)
    for _ in range(n_blobs):
        c = lung_idx[rng.integers(len(lung_idx))] / (np.asarray(shape) / 2) - 1
        r = rng.uniform(0.1, 0.25)
        blob = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2) & lung
        core = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < (r / 2) ** 2) & lung
        opacity[blob] = 1
        opacity[core] = 2
    hu[opacity == 1] = -550.0
    hu[opacity == 2] = 20.0
    hu += rng.normal(0, 10, shape).astype(np.float32)
    return ToyPhantom(hu.astype(np.int16), lobes, opacity, tuple(float(s) for s in spacing))


# --------------------------------------------------------------------------------------------
# Network


@pytest.mark.parametrize("tile,classes", [((128, 128, 128), 6), ((64, 128, 128), 3)])
@pytest.mark.parametrize("batch", [1, 2])
def test_unet_output_shape_for_stage_tiles(tile, classes, batch):
    model = UNet3D(UNetConfig(n_classes=classes, base=2, top_convs=1)).eval()
    with torch.no_grad():
        out = model(torch.zeros(batch, 1, *tile))
    assert out.shape == (batch, classes, *tile)
    assert out.dtype == torch.float32


def test_unet_config_round_trip_and_refusals():
    cfg = UNetConfig(n_classes=3, base=12, top_convs=1)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.channels() == [12, 24, 48, 96]
    with pytest.raises(ValueError, match="`n_classes` must be"):
        UNetConfig(n_classes=1)
    with pytest.raises(ValueError, match="`tile_shape` must be three positive multiples of 8"):
        check_tile_shape((64, 100, 128), cfg)


# --------------------------------------------------------------------------------------------
# Data: orientation, seeds, determinism


def _toy_source(spec, seed=3):
    ph = toy_phantom(seed, "moderate", spacing=spec.spacing_mm,
                     shape=spec.synth_shape or spec.tile_shape)
    return D.phantom_source(spec, seed, "moderate", lambda *a, **k: ph)


def _column_centroids(label: np.ndarray) -> tuple[float, float]:
    cols = np.arange(label.shape[2])[None, None, :]
    right = np.isin(label, (1, 2, 3))
    left = np.isin(label, (4, 5))
    return float((cols * right).sum() / right.sum()), float((cols * left).sum() / left.sum())


def test_lobes_augmentation_never_mirrors_left_right():
    spec = SMALL_LOBES
    source = _toy_source(spec)
    hu, lab = torch.from_numpy(source.hu), torch.from_numpy(source.label)
    right0, left0 = _column_centroids(source.label)
    assert right0 < left0  # the toy phantom is canonical: right lung at low columns
    for i in range(40):
        params = D.sample_params(np.random.default_rng(i), spec, (np.array(hu.shape) - 1) / 2,
                                 D.AugmentConfig())
        assert not params["flip"]
        assert np.linalg.det(params["matrix"]) > 0 and params["matrix"][2, 2] > 0
        x, y = D.augment(hu, lab, params, source.spacing, spec)
        right, left = _column_centroids(y.numpy())
        assert right < left, f"sample {i}: right lung moved to the patient's left"
        assert x.shape == (1, *spec.tile_shape) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0


def test_opacity_augmentation_does_flip_so_the_lobe_check_can_fail():
    # The same check applied to a stage that may flip must see mirrored samples.
    spec = replace(SMALL_OPACITY, classes=SMALL_LOBES.classes)
    source = _toy_source(replace(SMALL_LOBES, tile_shape=(32, 48, 48)))
    hu, lab = torch.from_numpy(source.hu), torch.from_numpy(source.label)
    flipped = 0
    for i in range(20):
        params = D.sample_params(np.random.default_rng(i), spec, (np.array(hu.shape) - 1) / 2,
                                 replace(D.AugmentConfig(), centre_jitter=0.0))
        _, y = D.augment(hu, lab, params, source.spacing, spec, out_shape=(32, 48, 48))
        right, left = _column_centroids(y.numpy())
        flipped += right > left
        assert (right > left) == params["flip"]
    assert 0 < flipped < 20


def test_identity_warp_reproduces_the_source():
    spec = SMALL_LOBES
    source = _toy_source(spec)
    params = D.sample_params(np.random.default_rng(0), spec, (np.array(source.hu.shape) - 1) / 2,
                             None)
    x, y = D.augment(torch.from_numpy(source.hu), torch.from_numpy(source.label), params,
                     source.spacing, spec)
    np.testing.assert_array_equal(y.numpy(), source.label)
    expected = np.clip((source.hu.astype(np.float32) + 1024) / 1624, 0, 1)
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-4)


def test_training_chunks_use_training_seeds_only():
    seen = []

    def recording(seed, severity="moderate", **kw):
        seen.append(seed)
        return toy_phantom(seed, severity, **kw)

    cfg = D.DataConfig(stage="opacity", seed=7, crops_per_source=2)
    spec = SMALL_OPACITY
    for i in range(6):
        chunk = D.make_chunk(replace(cfg, synth_kwargs={"shape": spec.synth_shape}), i,
                             synthesize=recording)
        assert len(chunk["params"]) == 2
    val = D.validation_chunk("opacity", 0, synthesize=recording,
                             synth_kwargs={"shape": spec.synth_shape})
    assert all(0 <= s < D.VALIDATION_SEED_BASE for s in seen[:6])
    assert seen[6] >= D.VALIDATION_SEED_BASE and val["params"][0]["flip"] is False
    with pytest.raises(ValueError, match="`seed` must be in"):
        D.check_training_seed(D.VALIDATION_SEED_BASE)


def test_opacity_targets_are_zero_outside_the_lung():
    ph = toy_phantom(5, "critical", spacing=(2.0, 1.5, 1.5), shape=(40, 56, 56))
    ph.opacity[0, 0, 0] = 2  # a stray label outside the lung must not become a target
    source = D.phantom_source(D.STAGES["opacity"], 5, "critical", lambda *a, **k: ph)
    assert source.label[0, 0, 0] == 0
    assert source.label.max() == 2 and not source.label[ph.lobes == 0].any()


def test_nodules_are_faint_ground_glass_in_free_lung_and_leave_vessels_alone():
    from appliance.lesions import HU_TOP, add_nodules

    shape = (30, 60, 60)
    hu = np.random.default_rng(3).normal(-850, 20, shape).astype(np.int16)
    hu[:, 28:31, :] = 80  # a dense wall crossing the lung: must stay as it is
    lung = np.zeros(shape, bool)
    lung[3:27, 5:55, 5:55] = True
    label = np.zeros(shape, np.uint8)
    label[3:27, 5:55, 5:20] = 2  # a lesion already there keeps its label
    hu0, label0 = hu.copy(), label.copy()
    ids = np.zeros(shape, np.uint16)
    n = add_nodules(np.random.default_rng(1), hu, label, lung, (2.0, 1.5, 1.5), count=(8, 8), ids=ids)
    new = label != label0
    assert n == int(new.sum()) > 0 and ((ids > 0) == new).all() and 1 < ids.max() <= 8
    assert (label[new] == 1).all() and lung[new].all() and not label0[new].any()
    assert not ((hu != hu0) & ~new).any() and (hu >= hu0).all()
    assert (hu[hu0 >= HU_TOP] == hu0[hu0 >= HU_TOP]).all()
    parenchyma = new & (hu0 < -600)
    assert hu[parenchyma].mean() > hu0[parenchyma].mean() + 60 and hu[parenchyma].max() < -300
    hu2, label2 = hu0.copy(), label0.copy()
    add_nodules(np.random.default_rng(1), hu2, label2, lung, (2.0, 1.5, 1.5), count=(8, 8))
    assert (hu2 == hu).all() and (label2 == label).all()


def test_nodules_join_opacity_chunks_only_and_change_nothing_else():
    spec = SMALL_OPACITY
    base = D.DataConfig(stage="opacity", seed=4, crops_per_source=8, real_fraction=0.0,
                        synth_kwargs={"shape": spec.synth_shape},
                        augment=replace(D.AugmentConfig(), centre_jitter=0.0))
    plain = D.make_chunk(base, 2, synthesize=toy_phantom)
    with_nodules = D.make_chunk(replace(base, nodule_fraction=1.0), 2, synthesize=toy_phantom)
    a, b = plain["source"], with_nodules["source"]
    assert b.origin == a.origin + ":nodules"
    added = (b.label > 0) & (a.label == 0)
    assert added.any() and (b.label[a.label > 0] == a.label[a.label > 0]).all()
    assert not (a.hu != b.hu)[~added].any()
    # some crops aim at the nodules (a few hundred voxels among the lesions)
    aimed = [tuple(np.rint(p["centre"]).astype(int)) for p in with_nodules["params"]]
    assert any(added[c] for c in aimed) and not any(added[tuple(np.rint(p["centre"]).astype(int))]
                                                    for p in plain["params"])
    lobes = D.DataConfig(stage="lobes", seed=4, synth_kwargs={"shape": (24, 24, 24)})
    assert not D.make_chunk(replace(lobes, nodule_fraction=1.0), 2, synthesize=toy_phantom)[
        "source"].origin.endswith(":nodules")
    with pytest.raises(ValueError, match="`nodule_fraction` must be in"):
        replace(base, nodule_fraction=1.5)


def test_chunk_stream_is_the_same_with_worker_processes():
    cfg = D.DataConfig(stage="lobes", seed=1, crops_per_source=2,
                       synth_kwargs={"shape": (24, 24, 24)})
    ds = D.ChunkDataset(cfg, synthesize=toy_phantom)
    a = D.chunk_loader(ds, 3, workers=0)
    b = D.chunk_loader(ds, 3, workers=2)
    for _ in range(3):
        ca, cb = next(a), next(b)
        assert ca["index"] == cb["index"]
        np.testing.assert_array_equal(ca["source"].hu, cb["source"].hu)
        np.testing.assert_allclose(ca["params"][1]["matrix"], cb["params"][1]["matrix"])
    del b


def test_sample_stream_resumes_mid_group():
    cfg = D.DataConfig(stage="lobes", seed=2, crops_per_source=3,
                       synth_kwargs={"shape": (16, 16, 16)})
    ds = D.ChunkDataset(cfg, synthesize=toy_phantom)

    def take(start, n):
        chunks = D.chunk_loader(ds, D.first_chunk(cfg, start, 2), workers=0)
        stream = D.sample_stream(chunks, cfg, start, 2)
        return [(s.origin, p["noise_seed"]) for s, p in (next(stream) for _ in range(n))]

    full = take(0, 10)
    assert take(4, 6) == full[4:]
    assert len({o for o, _ in full[:6]}) == 2  # a group mixes its two sources


# --------------------------------------------------------------------------------------------
# Training


def _trainer(tmp_path, stage, steps, monkeypatch, **kw):
    from export.train import TrainConfig, Trainer

    monkeypatch.setitem(D.STAGES, "lobes", SMALL_LOBES)
    monkeypatch.setitem(D.STAGES, "opacity", SMALL_OPACITY)
    spec = D.STAGES[stage]
    cfg = TrainConfig(stage=stage, steps=steps, batch=2, base=2, workers=0, crops=2, group=2,
                      val_every=0, val_samples=1, out=str(tmp_path / stage), log_every=1,
                      threads=1, **kw)
    return Trainer(cfg, synthesize=toy_phantom, quiet=True,
                   synth_kwargs={"shape": spec.synth_shape or spec.tile_shape})


def test_training_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = _trainer(tmp_path / "a", "lobes", 2, monkeypatch)
    straight.run()
    first = _trainer(tmp_path / "b", "lobes", 1, monkeypatch)
    first.run()
    assert (tmp_path / "b" / "lobes" / "last.pt").exists()
    resumed = _trainer(tmp_path / "b", "lobes", 2, monkeypatch)
    assert resumed.step == 1 and resumed.samples == 2
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    oa, ob = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    torch.testing.assert_close(oa[0]["exp_avg"], ob[0]["exp_avg"], rtol=0, atol=0)
    log = [json.loads(line) for line in (tmp_path / "b" / "lobes" / "log.jsonl").read_text()
           .splitlines()]
    assert [e["event"] for e in log].count("resume") == 1
    weights = torch.load(tmp_path / "b" / "lobes" / "lobes.pt", weights_only=False)
    assert weights["training"]["steps"] == 2 and "validation_dice" in weights["metrics"]


def test_a_crash_mid_run_still_saves_what_was_learnt(tmp_path, monkeypatch):
    calls = []

    def failing(seed, severity="moderate", **kw):
        calls.append(seed)
        if len(calls) > 2:
            raise RuntimeError("generator broke")
        return toy_phantom(seed, severity, **kw)

    trainer = _trainer(tmp_path, "lobes", 10, monkeypatch)
    trainer.synthesize = failing
    with pytest.raises(RuntimeError, match="generator broke"):
        trainer.run()
    saved = torch.load(tmp_path / "lobes" / "last.pt", weights_only=False)
    assert saved["step"] == trainer.step >= 1
    log = (tmp_path / "lobes" / "log.jsonl").read_text()
    assert '"event": "crashed"' in log


def test_resume_refuses_another_network(tmp_path, monkeypatch):
    _trainer(tmp_path, "lobes", 1, monkeypatch).run()
    with pytest.raises(ValueError, match="trained with another network"):
        _trainer(tmp_path, "lobes", 2, monkeypatch, top_convs=2)


def test_opacity_training_smoke_runs_and_validates(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "opacity", 2, monkeypatch)
    result = trainer.run()
    assert result["step"] == 2 and result["stop"] == "steps"
    assert set(result["dice"]) >= {"ggo", "consolidation", "mean"}


def test_time_budget_stops_cleanly(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "lobes", None, monkeypatch, minutes=0.02)
    result = trainer.run()
    assert result["stop"] == "time" and (tmp_path / "lobes" / "lobes.pt").exists()


def test_loss_prefers_the_right_answer_and_handles_lung_only_targets():
    from export.train import seg_loss

    target = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6, 2:4] = 1
    target[:, 2:6, 2:6, 5:7] = 4
    good = F_one_hot_logits(target, 6)
    wrong = F_one_hot_logits(torch.where(target == 1, 4, torch.where(target == 4, 1, target)), 6)
    full = torch.zeros(2, dtype=torch.long)
    assert seg_loss(good, target, full) < 0.2 < seg_loss(wrong, target, full)
    lung_only = torch.ones(2, dtype=torch.long)
    lung = (target > 0).long()
    # For lung-only targets a lobe mix-up costs nothing; missing the lung does.
    assert seg_loss(wrong, lung, lung_only) < 0.2
    assert seg_loss(F_one_hot_logits(torch.zeros_like(target), 6), lung, lung_only) > 1.0


def F_one_hot_logits(labels, n):  # noqa: N802 - reads like the torch function it wraps
    return torch.nn.functional.one_hot(labels, n).permute(0, 4, 1, 2, 3).float() * 10.0


def test_lr_schedule_warms_up_then_decays():
    from export.train import lr_at

    values = [lr_at(p / 100, 1.0) for p in range(101)]
    top = int(np.argmax(values))
    assert values[0] < values[top] and top <= 5
    assert all(a >= b for a, b in zip(values[top:], values[top + 1:], strict=False))
    assert values[-1] == pytest.approx(0.02)


def test_train_cli_refuses_bad_values(capsys):
    from export.train import main

    assert main(["--stage", "lobes", "--device", "cpu"]) == 2
    assert "`steps` or `minutes` must be given" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# ONNX export


TINY_TILE = (16, 32, 32)


def test_position_channels_span_each_tile_axis():
    from export.unet import position_channels

    pos = position_channels(torch.zeros(2, 1, 4, 5, 6))
    assert pos.shape == (2, 3, 4, 5, 6)
    assert torch.allclose(pos[0, 0, :, 0, 0], torch.linspace(-1, 1, 4))
    assert torch.allclose(pos[1, 1, 0, :, 0], torch.linspace(-1, 1, 5))
    assert torch.allclose(pos[0, 2, 3, 4, :], torch.linspace(-1, 1, 6))
    # the network really sees them: the same image in two tiles of a model with coords differs
    model = UNet3D(UNetConfig(n_classes=2, base=2, top_convs=1, coords=1)).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 8, 8, 8))
    assert not torch.allclose(out[..., 0, 0, 0], out[..., 7, 7, 7])


def _tiny_model(classes=3, seed=0, coords=0):
    torch.manual_seed(seed)
    model = UNet3D(UNetConfig(n_classes=classes, base=4, top_convs=1, coords=coords))
    # Non-trivial BatchNorm statistics, so folding them into the convolutions is exercised.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _smooth_tiles(n, shape=TINY_TILE, seed=0):
    from scipy import ndimage

    x = np.random.default_rng(seed).random((n, 1, *shape))
    x = ndimage.gaussian_filter(x, (0, 0, 1.5, 1.5, 1.5))
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


@pytest.mark.parametrize("coords", [0, 1])
def test_onnx_round_trip_matches_pytorch(tmp_path, coords):
    pytest.importorskip("onnx")
    import onnx

    from export.onnx import compare, export_onnx, ort_run, ort_session

    model = _tiny_model(coords=coords)
    path = export_onnx(model, TINY_TILE, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Identity" not in ops  # BN folded, graph clean
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert proto.graph.input[0].name == "image" and dims[1:] == [1, *TINY_TILE]
    assert isinstance(dims[0], str)  # dynamic batch
    x = _smooth_tiles(3)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = ort_run(ort_session(path), x)
    assert out.shape == (3, 3, *TINY_TILE)
    result = compare(ref, out)
    assert result["max_abs_logit_diff"] < 1e-3 and result["argmax_agreement"] >= 0.999


def test_fp16_variant_agrees_with_fp32(tmp_path):
    pytest.importorskip("onnxconverter_common")
    import onnx

    from export.onnx import compare, convert_fp16, export_onnx, ort_run, ort_session

    path = export_onnx(_tiny_model(), TINY_TILE, tmp_path / "m.onnx")
    half = convert_fp16(path, tmp_path / "m.fp16.onnx")
    proto = onnx.load(str(half))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    x = _smooth_tiles(2, seed=1)
    result = compare(ort_run(ort_session(path), x), ort_run(ort_session(half), x))
    assert result["argmax_agreement"] >= 0.995, result
    assert half.stat().st_size < path.stat().st_size


def test_export_stage_writes_a_manifest_the_runtime_loads(tmp_path, monkeypatch):
    pytest.importorskip("onnxconverter_common")
    from appliance.runtime.base import load_manifest
    from appliance.runtime.onnxruntime import OnnxRuntimeRunner
    from export.onnx import export_stage

    small = {"lobes": replace(D.STAGES["lobes"], tile_shape=TINY_TILE),
             "opacity": replace(D.STAGES["opacity"], tile_shape=TINY_TILE)}
    for stage, spec in small.items():
        model = _tiny_model(spec.n_classes)
        torch.save({"stage": stage, "unet": model.config.to_dict(),
                    "state_dict": model.state_dict(), "training": {"steps": 0},
                    "metrics": {"validation_dice": {"mean": 0.5}}}, tmp_path / f"{stage}.pt")
        entry = export_stage(tmp_path / f"{stage}.pt", models_dir=tmp_path / "models", tiles=2,
                             spec=spec, real_dir=tmp_path / "no-real")
        assert entry["metrics"]["export"]["fp32_vs_torch"]["argmax_agreement"] >= 0.999
    manifest = json.loads((tmp_path / "models" / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    lobes = manifest["models"]["lobes"]
    assert list(lobes) == ["name", "version", "file", "fp16_file", "sha256", "fp16_sha256",
                           "classes", "spacing_mm", "tile_shape", "overlap", "normalization",
                           "output", "input_name", "output_name", "batch", "architecture",
                           "training", "metrics"]
    assert lobes["classes"] == ["background", "RUL", "RML", "RLL", "LUL", "LLL"]
    assert lobes["spacing_mm"] == list(D.STAGES["lobes"].spacing_mm) and lobes["output"] == "logits"
    assert manifest["models"]["opacity"]["normalization"] == {"hu_min": -1024.0, "hu_max": 400.0}
    specs = load_manifest(tmp_path / "models")
    for precision in ("fp32", "fp16"):
        with OnnxRuntimeRunner(specs["opacity"], precision=precision) as runner:
            out = runner.infer(_smooth_tiles(2))
        assert out.shape == (2, 3, *TINY_TILE)


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    from export.onnx import load_model

    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="`weights` must be a file written by export.train"):
        load_model(tmp_path / "x.pt")


# --------------------------------------------------------------------------------------------
# Real-scan preparation


def test_to_canonical_undoes_flips_and_permutations():
    from export.prepare_real import to_canonical

    canonical = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    # Stored as (rows along -y, slices along +z, columns along -x).
    stored = np.flip(np.flip(np.transpose(canonical, (1, 0, 2)), 0), 2)
    direction = np.array([[0, -1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])
    np.testing.assert_array_equal(to_canonical(stored, direction), canonical)
    with pytest.raises(ValueError, match="`direction` must be axis-aligned"):
        to_canonical(stored, np.full((3, 3), 0.577))


def test_prepare_real_refuses_evaluation_scans():
    from export.prepare_real import load

    with pytest.raises(ValueError, match="must not be an evaluation scan"):
        load(Path("/work/shared/data/real/covid-ct-md/covid-P001"))


@pytest.mark.parametrize("coords", [0, 1])
def test_unfolded_onnx_weights_reproduce_the_model_in_eval_and_train_mode(tmp_path, coords):
    pytest.importorskip("onnx")
    from export.onnx import export_onnx, ort_run, ort_session
    from export.unfold import calibrate_batchnorm, load_folded

    path = export_onnx(_tiny_model(coords=coords), TINY_TILE, tmp_path / "m.onnx")
    x = _smooth_tiles(2, seed=4)
    onnx_out = ort_run(ort_session(path), x)
    fresh = UNet3D(UNetConfig(n_classes=3, base=4, top_convs=1, coords=coords))
    assert load_folded(fresh, path) == sum(
        isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d) for m in fresh.modules())
    with torch.no_grad():
        eval_out = fresh.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(eval_out, onnx_out, atol=1e-4)
    calibrate_batchnorm(fresh, torch.from_numpy(x))
    with torch.no_grad():
        again = fresh.eval()(torch.from_numpy(x)).numpy()
        train_out = fresh.train()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(again, onnx_out, atol=1e-4)
    # Batch statistics equal the calibrated ones on the calibration batch: train mode agrees too.
    np.testing.assert_allclose(train_out, onnx_out, atol=1e-3)


def test_unfold_refuses_another_architecture(tmp_path):
    pytest.importorskip("onnx")
    from export.onnx import export_onnx
    from export.unfold import load_folded

    path = export_onnx(_tiny_model(), TINY_TILE, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="shape"):
        load_folded(UNet3D(UNetConfig(n_classes=3, base=8, top_convs=1)), path)
    with pytest.raises(ValueError, match="layers"):
        load_folded(UNet3D(UNetConfig(n_classes=3, base=4, top_convs=2)), path)
    with pytest.raises(ValueError, match="ONNX file"):
        load_folded(UNet3D(UNetConfig(n_classes=3, base=4, top_convs=1)), tmp_path / "nope.onnx")


def test_training_can_start_from_an_exported_model(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from export.onnx import export_onnx

    first = _trainer(tmp_path / "a", "lobes", 1, monkeypatch)
    first.run()
    path = export_onnx(first.model.eval(), SMALL_LOBES.tile_shape, tmp_path / "lobes.onnx")
    second = _trainer(tmp_path / "b", "lobes", 1, monkeypatch, init_from=str(path))
    x = torch.from_numpy(_smooth_tiles(1, SMALL_LOBES.tile_shape, seed=2))
    with torch.no_grad():
        torch.testing.assert_close(second.model.eval()(x), first.model.eval()(x), atol=1e-4, rtol=0)
    result = second.run()
    assert result["step"] == 1
    log = (tmp_path / "b" / "lobes" / "log.jsonl").read_text()
    assert '"event": "init"' in log
    weights = torch.load(tmp_path / "b" / "lobes" / "lobes.pt", weights_only=False)
    assert weights["training"]["init_from"].startswith("lobes.onnx (sha256 ")


def test_a_frozen_batchnorm_continuation_trains_the_exported_function(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from export.onnx import export_onnx

    first = _trainer(tmp_path / "a", "lobes", 1, monkeypatch)
    first.run()
    path = export_onnx(first.model.eval(), SMALL_LOBES.tile_shape, tmp_path / "lobes.onnx")
    x = torch.from_numpy(_smooth_tiles(2, SMALL_LOBES.tile_shape, seed=3))
    for freeze in (True, False):
        second = _trainer(tmp_path / f"b{freeze}", "lobes", 2, monkeypatch, init_from=str(path), freeze_bn=freeze)
        bns = [m for m in second.model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
        before = [bn.running_var.clone() for bn in bns]
        second.run()
        # frozen: the identity statistics of the unfolded export stay; otherwise batch statistics
        assert all(torch.equal(b, bn.running_var) for b, bn in zip(before, bns, strict=True)) == freeze
        second.train_mode()
        with torch.no_grad():
            training_forward = second.model(x)
            eval_forward = second.model.eval()(x)
        # frozen: what training optimises is the eval (= exported) function, on any batch
        assert torch.allclose(training_forward, eval_forward, atol=1e-5) == freeze
        assert ("batchnorm" in second.summary()) == freeze


def test_a_continued_model_records_the_version_it_started_from(tmp_path):
    from appliance.runtime.base import MODELS_DIR
    from export.onnx import sha256_of
    from export.train import describe_model_file

    onnx_file = tmp_path / "lobes.onnx"
    onnx_file.write_bytes(b"not really a model, only its digest matters here")
    digest = sha256_of(onnx_file)[:12]
    assert describe_model_file(onnx_file) == f"lobes.onnx (sha256 {digest})"  # no manifest beside it
    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())  # a complete manifest
    manifest["models"]["lobes"]["version"] = "0.3.0"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert describe_model_file(onnx_file) == f"lobes.onnx 0.3.0 (sha256 {digest})"
    (tmp_path / "manifest.json").write_text("{ broken")
    assert describe_model_file(onnx_file) == f"lobes.onnx (sha256 {digest})"


# --------------------------------------------------------------------------------------------
# Model soup (weight averaging of continuations)


def _save_weights(model, path, stage="opacity"):
    torch.save({"stage": stage, "unet": model.config.to_dict(), "state_dict": model.state_dict(),
                "training": {"steps": 7}, "metrics": {}}, path)
    return path


def test_a_soup_is_the_weighted_mean_of_the_folded_layers(tmp_path):
    pytest.importorskip("onnx")
    from export.onnx import export_onnx, load_model
    from export.soup import make_soup, read_ingredient

    a = _save_weights(_tiny_model(seed=0), tmp_path / "a.pt")
    b = _save_weights(_tiny_model(seed=1), tmp_path / "b.pt")
    soup = make_soup([a, b], [1.0, 3.0], tmp_path / "soup.pt")
    la, lb, ls = (read_ingredient(p).layers for p in (a, b, soup))
    assert all(not np.allclose(la[n][0], lb[n][0]) for n in la)  # two different networks
    for name, (weight, bias) in ls.items():
        np.testing.assert_allclose(weight, 0.25 * la[name][0] + 0.75 * lb[name][0], atol=1e-6)
        np.testing.assert_allclose(bias, 0.25 * la[name][1] + 0.75 * lb[name][1], atol=1e-6)
    stage, _, training, _ = load_model(soup)
    assert stage == "opacity"
    assert [i["coefficient"] for i in training["ingredients"]] == [0.25, 0.75]
    assert training["ingredients"][0]["model"].startswith(f"{tmp_path.name}/a.pt step 7 (sha256 ")

    # a shipped ONNX file is an ingredient too (architecture from the manifest beside it), and a
    # soup that takes all of one ingredient computes what that ingredient computes
    folder = tmp_path / "models"
    export_onnx(_tiny_model(seed=0), TINY_TILE, folder / "opacity.onnx")
    config = _tiny_model().config.to_dict()
    (folder / "manifest.json").write_text(json.dumps(
        {"models": {"opacity": {"name": "opacity", "file": "opacity.onnx", "architecture": config}}}))
    only_a = make_soup([folder / "opacity.onnx", b], [1.0, 0.0], tmp_path / "only_a.pt")
    _, model, _, _ = load_model(only_a)
    x = torch.from_numpy(_smooth_tiles(2, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _tiny_model(seed=0)(x), atol=1e-4, rtol=0)


def test_a_soup_refuses_what_cannot_be_averaged(tmp_path, capsys):
    pytest.importorskip("onnx")
    from export.soup import main, make_soup

    a = _save_weights(_tiny_model(seed=0), tmp_path / "a.pt")
    wider = _save_weights(_tiny_model(seed=0, coords=1), tmp_path / "coords.pt")
    lobes = _save_weights(_tiny_model(seed=0), tmp_path / "lobes.pt", stage="lobes")
    with pytest.raises(ValueError, match="another network"):
        make_soup([a, wider], None, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="the lobes stage"):
        make_soup([a, lobes], None, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="at least two"):
        make_soup([a], None, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="non-negative"):
        make_soup([a, a], [1.0, -1.0], tmp_path / "x.pt")
    assert main([str(a), str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pt` is not a file" in err
    (tmp_path / "notes.pt").write_text("# not weights")
    assert main([str(a), str(tmp_path / "notes.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert main([str(a), str(a), "--coefficients", "1,x", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "must be a file written by export.train" in err[0] and "comma-separated numbers" in err[1]
    assert not (tmp_path / "x.pt").exists()


def test_a_soup_refuses_an_onnx_ingredient_it_cannot_read(tmp_path):
    from export.soup import make_soup

    a = _save_weights(_tiny_model(seed=0), tmp_path / "a.pt")
    folder = tmp_path / "models"
    folder.mkdir()
    fake = folder / "opacity.onnx"
    fake.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="no manifest.json beside it"):
        make_soup([a, fake], None, tmp_path / "x.pt")
    (folder / "manifest.json").write_text("{ broken")
    with pytest.raises(ValueError, match="is not a models manifest"):
        make_soup([a, fake], None, tmp_path / "x.pt")
    config = _tiny_model().config.to_dict()
    (folder / "manifest.json").write_text(json.dumps(
        {"models": {"opacity": {"name": "opacity", "file": "opacity.onnx", "architecture": config}}}))
    with pytest.raises(ValueError, match="is not an exported ONNX model"):
        make_soup([a, fake], None, tmp_path / "x.pt")
