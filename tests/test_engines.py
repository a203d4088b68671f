"""Engine builder, cache, parity check and the `engines` command, against FakeTensorRT/FakePyCuda.

The fakes (tests/fake_tensorrt.py) stand in for TensorRT and pycuda, which cannot be installed
here; the ONNX models are real (tests/onnx_models.py), and the fake engines compute with ONNX
Runtime, so parity numbers are real numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging

import numpy as np
import pytest

from appliance.runtime.base import BackendUnavailable, ModelError, load_manifest
from engines.build import (
    BuildError,
    BuildSettings,
    Platform,
    engine_key,
    engine_max_batch,
    ensure_engine,
    load_engine,
    make_logger,
)
from engines.cache import EngineCache, default_engine_dir
from tests.fake_tensorrt import add_fp16_variants, install_fakes
from tests.onnx_models import write_models


@pytest.fixture
def models(tmp_path):
    return add_fp16_variants(write_models(tmp_path / "models"))


@pytest.fixture
def cache(tmp_path):
    return EngineCache(tmp_path / "state" / "engines")


def platform(version: str = "10.9.0.34", **kw: str) -> Platform:
    return Platform(version, kw.get("gpu", "FakeGPU (test double)"), kw.get("cc", "9.0"), kw.get("driver", "580.10"))


def _set_manifest(models, key: str, **fields) -> None:
    path = models / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["models"][key].update(fields)
    path.write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- the cache


def test_build_then_cache_hit(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    spec = load_manifest(models)["lobes"]
    first = ensure_engine(trt, spec, BuildSettings(), platform(), cache)
    assert first.built and first.reason == "no cached engine" and len(trt.builds) == 1
    second = ensure_engine(trt, spec, BuildSettings(), platform(), cache)
    assert not second.built and second.reason == "cached" and second.plan == first.plan
    assert len(trt.builds) == 1
    meta = json.loads(cache.meta_path(first.key).read_text())
    assert meta["key"]["onnx_sha256"] == spec.sha256 and meta["key"]["gpu_name"] == "FakeGPU (test double)"
    assert meta["plan_sha256"] == hashlib.sha256(first.plan).hexdigest()
    assert first.path == cache.plan_path(first.key) and first.path.read_bytes() == first.plan
    assert cache.timing_cache_path("10.9.0.34", "FakeGPU (test double)", "9.0").exists()


@pytest.mark.parametrize("change", [
    {"platform": {"version": "10.10.0.31"}}, {"platform": {"gpu": "NVIDIA L4"}}, {"platform": {"cc": "8.9"}},
    {"platform": {"driver": "590.01"}}, {"settings": {"max_batch": 8}}, {"settings": {"opt_level": 5}},
    {"settings": {"workspace_gb": 2.0}}, {"settings": {"precision": "fp16"}},
], ids=lambda c: next(iter(next(iter(c.values())))))
def test_any_key_change_is_a_miss(models, cache, monkeypatch, change):
    trt, _cuda = install_fakes(monkeypatch)
    spec = load_manifest(models)["lobes"]
    base = ensure_engine(trt, spec, BuildSettings(), platform(), cache)
    other = ensure_engine(trt, spec, BuildSettings(**change.get("settings", {})),
                          platform(**change.get("platform", {})), cache)
    assert other.built and other.key != base.key and other.path != base.path
    assert len(trt.builds) == 2
    assert base.path.exists() and other.path.exists()


def test_a_changed_onnx_file_is_a_miss(models, cache, monkeypatch):
    import onnx

    from tests.onnx_models import conv_model, sha256

    trt, _cuda = install_fakes(monkeypatch)
    base = ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache)
    onnx.save(conv_model(np.arange(6.0), np.zeros(6), (32, 32, 32)), models / "lobes.onnx")
    _set_manifest(models, "lobes", sha256=sha256(models / "lobes.onnx"))
    new = ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache)
    assert new.built and new.key.onnx_sha256 != base.key.onnx_sha256 and len(trt.builds) == 2


def test_timing_cache_is_persisted_and_reused(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    specs = load_manifest(models)
    ensure_engine(trt, specs["lobes"], BuildSettings(), platform(), cache)
    ensure_engine(trt, specs["opacity"], BuildSettings(), platform(), cache)
    # The second build started from the first one's timing cache, read back from disk.
    assert [b["timing_cache_entries_in"] for b in trt.builds] == [0, 1]


def test_unusable_timing_cache_is_replaced(models, cache, monkeypatch, caplog):
    trt, _cuda = install_fakes(monkeypatch)
    path = cache.timing_cache_path("10.9.0.34", "FakeGPU (test double)", "9.0")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        record = ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache)
    assert record.built and trt.builds[0]["timing_cache_entries_in"] == 0
    assert "timing cache cannot be used" in caplog.text
    assert path.read_bytes().startswith(b"FAKE-TENSORRT-TIMING")


def test_corrupt_plan_is_rebuilt(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    spec = load_manifest(models)["lobes"]
    first = ensure_engine(trt, spec, BuildSettings(), platform(), cache)
    first.path.write_bytes(first.plan[:100])  # truncated on disk
    engine, record = load_engine(trt, trt.Runtime(make_logger(trt)), spec, BuildSettings(), platform(), cache)
    assert engine is not None and record.built and "corrupt" in record.reason
    assert len(trt.builds) == 2 and record.path.read_bytes() == record.plan


def test_plan_that_does_not_deserialize_is_discarded_and_rebuilt(models, cache, monkeypatch, caplog):
    trt, _cuda = install_fakes(monkeypatch)
    spec = load_manifest(models)["lobes"]
    first = ensure_engine(trt, spec, BuildSettings(), platform(), cache)
    garbage = b"not a plan at all"
    first.path.write_bytes(garbage)  # the sidecar agrees, so only deserialisation can tell
    meta = json.loads(cache.meta_path(first.key).read_text())
    meta.update(plan_bytes=len(garbage), plan_sha256=hashlib.sha256(garbage).hexdigest())
    cache.meta_path(first.key).write_text(json.dumps(meta))
    assert cache.load(first.key).hit
    with caplog.at_level(logging.WARNING):
        engine, record = load_engine(trt, trt.Runtime(make_logger(trt)), spec, BuildSettings(), platform(), cache)
    assert engine is not None and record.built and record.plan != garbage
    assert trt.deserializations == 2 and len(trt.builds) == 2
    assert "discarding cached TensorRT engine" in caplog.text and "does not deserialize" in caplog.text


def test_no_build_when_asked_not_to(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    with pytest.raises(BackendUnavailable, match=r"no usable TensorRT engine for lobes \(no cached engine\); "
                                                 r"run `appliance engines build`"):
        ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache, build_missing=False)
    assert trt.builds == []


def test_find_takes_the_newest_plan_with_other_tuning(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    spec = load_manifest(models)["lobes"]
    tuned = ensure_engine(trt, spec, BuildSettings(opt_level=5, workspace_gb=8.0), platform(), cache)
    record = ensure_engine(trt, spec, BuildSettings(), platform(), cache, any_tuning=True)
    assert not record.built and record.key == tuned.key and len(trt.builds) == 1
    # Exact lookups (what `engines build` does) still build the default settings.
    assert ensure_engine(trt, spec, BuildSettings(), platform(), cache).built


def test_cache_entries_report_problems(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    specs = load_manifest(models)
    a = ensure_engine(trt, specs["lobes"], BuildSettings(), platform(), cache)
    ensure_engine(trt, specs["opacity"], BuildSettings(), platform(), cache)
    assert [e.problem for e in cache.entries()] == [None, None]
    a.path.unlink()
    problems = {e.key.model: e.problem for e in cache.entries()}
    assert problems == {"lobes": "plan missing", "opacity": None}


# ----------------------------------------------------------------------------- precision and profile


def test_trt10_fp16_is_the_builder_flag_on_the_fp32_onnx(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch, version="10.9.0.34")
    spec = load_manifest(models)["lobes"]
    record = ensure_engine(trt, spec, BuildSettings(precision="fp16"), platform("10.9.0.34"), cache)
    build = trt.builds[-1]
    assert build["onnx_path"].endswith("lobes.onnx") and build["onnx_sha256"] == spec.sha256
    assert build["fp16_flag"] and build["builder_flags"] == ["FP16"]
    assert not build["strongly_typed"] and build["network_flags"] == 0
    assert record.key.fp16_flag and not record.key.strongly_typed and record.key.onnx_sha256 == spec.sha256


def test_trt11_fp16_is_the_fp16_onnx_strongly_typed_without_flags(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch, version="11.2.0.5")
    assert not hasattr(trt.BuilderFlag, "FP16")  # the fake, like TensorRT 11, has no weak typing
    spec = load_manifest(models)["lobes"]
    record = ensure_engine(trt, spec, BuildSettings(precision="fp16"), platform("11.2.0.5"), cache)
    build = trt.builds[-1]
    assert build["onnx_path"].endswith("lobes.fp16.onnx") and build["onnx_sha256"] == spec.fp16_sha256
    assert build["strongly_typed"] and build["builder_flags"] == [] and not build["fp16_flag"]
    assert record.key.strongly_typed and not record.key.fp16_flag and record.key.onnx_sha256 == spec.fp16_sha256


def test_trt11_fp32_is_the_fp32_onnx_strongly_typed(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch, version="11.2.0.5")
    ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform("11.2.0.5"), cache)
    build = trt.builds[-1]
    assert build["onnx_path"].endswith("lobes.onnx") and build["strongly_typed"] and build["builder_flags"] == []


def test_trt11_fp16_needs_the_fp16_variant(tmp_path, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch, version="11.2.0.5")
    spec = load_manifest(write_models(tmp_path / "fp32only"))["lobes"]
    with pytest.raises(ModelError, match="model lobes has no fp16 variant in the manifest"):
        ensure_engine(trt, spec, BuildSettings(precision="fp16"), platform("11.2.0.5"), cache)


def test_old_tensorrt_is_refused(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch, version="8.6.1")
    with pytest.raises(BackendUnavailable, match=r"TensorRT 8\.x is too old: 10\.x or 11\.x is needed"):
        ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform("8.6.1"), cache)


def test_profile_fixes_the_tile_and_varies_the_batch(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    ensure_engine(trt, load_manifest(models)["opacity"],
                  BuildSettings(max_batch=6, workspace_gb=1.5, opt_level=4), platform(), cache)
    build = trt.builds[-1]
    assert build["profiles"] == [{"image": ((1, 1, 16, 32, 32), (6, 1, 16, 32, 32), (6, 1, 16, 32, 32))}]
    assert build["workspace"] == int(1.5 * 2**30) and build["opt_level"] == 4


# ----------------------------------------------------------------------------- failures


def test_build_failure_is_a_one_line_build_error(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    trt.fail_builds = True
    with pytest.raises(BuildError, match=r"^TensorRT could not build an engine for lobes \(fp32\): "
                                         r"fake: out of memory while building \(asked by the test\)$"):
        ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache)
    assert list(cache.root.glob("*.plan")) == [] and list(cache.root.glob("*.json")) == []


def test_unparsable_onnx_is_a_model_error(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    (models / "lobes.onnx").write_bytes(b"not onnx")
    _set_manifest(models, "lobes", sha256=hashlib.sha256(b"not onnx").hexdigest())
    with pytest.raises(ModelError, match=r"^TensorRT cannot parse lobes\.onnx: ModelImporter: failed to parse"):
        ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache)


def test_onnx_file_must_match_the_manifest(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    _set_manifest(models, "lobes", sha256="0" * 64)
    with pytest.raises(ModelError, match=r"lobes\.onnx does not match the manifest's sha256"):
        ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache)
    assert trt.builds == []


def test_onnx_input_must_match_the_manifest_tile(models, cache, monkeypatch):
    trt, _cuda = install_fakes(monkeypatch)
    _set_manifest(models, "lobes", tile_shape=[16, 32, 32])
    with pytest.raises(ModelError, match=r"input shape \(-1, 1, 32, 32, 32\) does not match the manifest tile "
                                         r"\(N, 1, 16, 32, 32\)"):
        ensure_engine(trt, load_manifest(models)["lobes"], BuildSettings(), platform(), cache)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": "int8"}, "`precision` must be one of fp32, fp16, got 'int8'"),
    ({"max_batch": 0}, "`max_batch` must be a positive int, got 0"),
    ({"max_batch": True}, "`max_batch` must be a positive int, got True"),
    ({"workspace_gb": -1.0}, "`workspace_gb` must be a positive number, got -1.0"),
    ({"workspace_gb": float("nan")}, "`workspace_gb` must be a positive number, got nan"),
    ({"opt_level": 6}, "`opt_level` must be an int in 0..5, got 6"),
])
def test_build_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message.replace('(', r'[(]').replace(')', r'[)]')}$"):
        BuildSettings(**kwargs)


def test_engine_max_batch():
    assert [engine_max_batch(b) for b in (None, 1, 4, 8)] == [4, 4, 4, 8]
    with pytest.raises(ValueError, match="`batch_size` must be a positive int, got 0"):
        engine_max_batch(0)


def test_engine_key_digest_is_stable_and_readable(models):
    spec = load_manifest(models)["lobes"]
    a = engine_key(spec, BuildSettings(), platform())
    b = engine_key(spec, BuildSettings(), platform())
    assert a == b and a.digest == b.digest and a.stem.startswith("lobes-fp32-")
    assert engine_key(spec, BuildSettings(opt_level=1), platform()).identity() == a.identity()


def test_default_engine_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("APPLIANCE_GENERAL__STATE_DIR", raising=False)
    assert str(default_engine_dir()) == "/var/lib/appliance/engines"
    monkeypatch.setenv("APPLIANCE_GENERAL__STATE_DIR", str(tmp_path))
    assert default_engine_dir() == tmp_path / "engines"
    assert default_engine_dir("/srv/x") == default_engine_dir("/srv/x/")


# ----------------------------------------------------------------------------- parity


def test_sample_tiles_cuts_body_tiles(models):
    from appliance.phantom import synthesize
    from engines.verify import sample_tiles

    ph = synthesize(1_000_777, "moderate", spacing=(6.0, 6.0, 6.0), shape=(56, 64, 64))
    spec = load_manifest(models)["lobes"]
    tiles = sample_tiles(ph.hu, ph.spacing, spec, 3)
    assert tiles.shape[1:] == (1, 32, 32, 32) and 1 <= len(tiles) <= 3 and tiles.dtype == np.float32
    assert 0.0 <= tiles.min() and tiles.max() <= 1.0 and (tiles > 0.4).mean() > 0.1  # body, not air
    with pytest.raises(ValueError, match="`hu` must contain a body"):
        sample_tiles(np.full((40, 40, 40), -1000.0), (6.0, 6.0, 6.0), spec)


def test_compare_catches_disagreement(models):
    from engines.verify import compare

    spec = load_manifest(models)["opacity"]
    ref = np.random.default_rng(0).normal(size=(2, 3, 16, 32, 32)).astype(np.float32)
    assert compare(spec, "fp32", ref, ref.copy()).ok
    bad = ref.copy()
    bad[:, 0] += 5.0
    result = compare(spec, "fp32", ref, bad)
    assert not result.ok and result.argmax_agreement < 0.9 and result.max_abs_output_diff == pytest.approx(5.0)
    nan = ref.copy()
    nan[0, 0, 0, 0, 0] = np.nan
    assert not compare(spec, "fp16", ref, nan).ok


# ----------------------------------------------------------------------------- the command


def run_engines(argv: list[str]) -> int:
    from engines.cli import add_parser

    parser = argparse.ArgumentParser(prog="appliance")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _tensorrt_missing_here() -> bool:
    from appliance.runtime.select import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason() is not None


def _engines_wired() -> bool:
    from appliance.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "engines" in sub.choices


@pytest.fixture
def small_phantom(monkeypatch):
    from appliance.phantom import synthesize

    ph = synthesize(1_000_777, "moderate", spacing=(6.0, 6.0, 6.0), shape=(56, 64, 64))
    monkeypatch.setattr("engines.verify.phantom_volume", lambda: (ph.hu, ph.spacing, "small test phantom"))
    return ph


@pytest.mark.skipif(not _tensorrt_missing_here(), reason="this machine has TensorRT and a GPU")
def test_engines_build_is_refused_without_tensorrt(tmp_path, capsys):
    with pytest.raises(BackendUnavailable, match="^cannot build TensorRT engines: the tensorrt Python module is "
                                                 "not installed$"):
        run_engines(["engines", "build", "--state-dir", str(tmp_path)])
    if not _engines_wired():
        pytest.skip("`engines` is not wired into appliance.cli yet; checked through engines.cli.run above")
    from appliance.cli import main

    assert main(["engines", "build", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["appliance: cannot build TensorRT engines: the tensorrt Python module is not installed"]


@pytest.mark.skipif(not _tensorrt_missing_here(), reason="this machine has TensorRT and a GPU")
def test_analyze_with_backend_tensorrt_is_refused_without_tensorrt(models, tmp_path, monkeypatch, capsys):
    import sys

    from appliance import cli

    # StderrProgress binds sys.stderr when appliance.cli is imported (maybe under an earlier
    # test's closed capture); point it at this test's stderr.
    monkeypatch.setattr(cli.StderrProgress.__init__, "__defaults__", (sys.stderr,))
    monkeypatch.setenv("APPLIANCE_ANALYSIS__MODELS_DIR", str(models))
    main = cli.main
    assert main(["analyze", str(tmp_path), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["appliance: backend tensorrt is unavailable: the tensorrt Python module is not installed"]


def test_engines_build_list_verify(models, tmp_path, monkeypatch, capsys, small_phantom):
    state = tmp_path / "state"
    common = ["--state-dir", str(state), "--models-dir", str(models)]
    with monkeypatch.context() as mp:
        trt, _cuda = install_fakes(mp)
        assert run_engines(["engines", "build", *common, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["model"], r["status"], r["max_batch"]) for r in rows] == [("lobes", "built", 4),
                                                                             ("opacity", "built", 4)]
        assert run_engines(["engines", "build", *common, "--model", "opacity"]) == 0
        out = capsys.readouterr().out
        assert "opacity" in out and "cached" in out and "lobes" not in out and len(trt.builds) == 2
        assert run_engines(["engines", "build", *common, "--model", "lobes", "--force"]) == 0
        assert len(trt.builds) == 3 and "built" in capsys.readouterr().out

        assert run_engines(["engines", "list", "--state-dir", str(state), "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert sorted((e["model"], e["state"]) for e in listed["engines"]) == [("lobes", "current"),
                                                                               ("opacity", "current")]

        assert run_engines(["engines", "verify", *common, "--tiles", "3", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["source"] == "small test phantom"
        assert [(r["model"], r["ok"]) for r in report["results"]] == [("lobes", True), ("opacity", True)]
        assert all(r["argmax_agreement"] == 1.0 and r["max_abs_output_diff"] == 0.0 for r in report["results"])
        assert len(trt.builds) == 3  # verify used the cached engines

        trt.executor.corrupt_output = True
        assert run_engines(["engines", "verify", *common, "--model", "lobes", "--tiles", "2"]) == 1
        captured = capsys.readouterr()
        assert "FAILED" in captured.out
        assert captured.err.strip().splitlines()[-1] == "appliance: TensorRT parity check failed for lobes"

    # Without TensorRT (this machine) the cache can still be listed; its platform is unknown.
    if _tensorrt_missing_here():
        assert run_engines(["engines", "list", "--state-dir", str(state)]) == 0
        out = capsys.readouterr().out
        assert "2 engine(s); current platform unknown (the tensorrt Python module is not installed)" in out
        assert out.count("unknown") >= 3


@pytest.mark.parametrize("version", ["10.9.0.34", "11.2.0.5"])
def test_engines_verify_fp16(models, tmp_path, monkeypatch, capsys, small_phantom, version):
    trt, _cuda = install_fakes(monkeypatch, version=version)
    args = ["engines", "verify", "--state-dir", str(tmp_path), "--models-dir", str(models), "--precision", "fp16",
            "--tiles", "2", "--json"]
    assert run_engines(args) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert all(r["ok"] and r["precision"] == "fp16" and r["argmax_agreement"] >= 0.995 for r in results)
    assert all(0 < r["max_abs_output_diff"] < 0.5 for r in results)  # fp16 rounding, not identity
    assert [b["onnx_path"].endswith(".fp16.onnx") for b in trt.builds] == [version.startswith("11")] * 2


def test_engines_refuses_an_unknown_model(models, tmp_path, monkeypatch):
    from appliance.cli import Refused

    install_fakes(monkeypatch)
    with pytest.raises(Refused, match=r"^unknown model 'lungs': the manifest has lobes, opacity$"):
        run_engines(["engines", "build", "--state-dir", str(tmp_path), "--models-dir", str(models),
                     "--model", "lungs"])


def test_engines_build_without_gpu(models, tmp_path, monkeypatch):
    install_fakes(monkeypatch, device_count=0)
    with pytest.raises(BackendUnavailable, match="^cannot build TensorRT engines: no CUDA GPU answers$"):
        run_engines(["engines", "build", "--state-dir", str(tmp_path), "--models-dir", str(models)])
