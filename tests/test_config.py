"""Typed config: defaults, TOML, environment overrides, strictness."""

import pytest

from appliance.config import ConfigError, describe_defaults, load_config


def test_defaults_without_file_or_env():
    c = load_config(env={})
    assert c.analysis.backend == "auto"
    assert c.qa.lung_volume_ml == (1500.0, 9500.0)
    assert c.analysis.involvement_min_pct == 0.1


def test_toml_then_environment(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[analysis]\nthreads = 3\nbackend = "onnxruntime"\n[qa]\nlobe_min_pct = 2.5\n')
    c = load_config(f, env={"APPLIANCE_ANALYSIS__THREADS": "5", "APPLIANCE_QA__LUNG_VOLUME_ML": "1000, 8000"})
    assert c.analysis.threads == 5  # environment beats the file
    assert c.analysis.backend == "onnxruntime"
    assert c.qa.lobe_min_pct == 2.5
    assert c.qa.lung_volume_ml == (1000.0, 8000.0)


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("[analysis]\nthreds = 2\n", {}, r"unknown key `analysis.threds` \(did you mean 'threads'\?\)"),
        ("[analysys]\n", {}, r"unknown section `\[analysys\]` \(did you mean 'analysis'\?\)"),
        ("[analysis]\nthreads = 'many'\n", {}, r"`analysis.threads` must be int"),
        ("", {"APPLIANCE_ANALYSIS__BACKEND": "tensorrtt"}, r"`analysis.backend` must be one of"),
        ("", {"APPLIANCE_QA__NOPE": "1"}, r"unknown key `qa.nope`"),
        ("[analysis\n", {}, r"not valid TOML"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path, text, env, match):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f, env=env)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_describe_defaults_round_trips(tmp_path):
    text = describe_defaults()
    assert "# Inference backend" in text
    f = tmp_path / "defaults.toml"
    f.write_text(text)
    assert load_config(f, env={}) == load_config(env={})
