import re

import pytest

from contracts.settings import PROJECT_ROOT, Settings, get_settings

ENV_EXAMPLE = PROJECT_ROOT / ".env.example"


def _documented_vars() -> dict[str, str]:
    found = {}
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^([A-Z0-9_]+)=(.*)$", line)
        if m:
            found[m.group(1)] = lines[i - 1] if i else ""
    return found


def test_every_setting_is_documented_with_a_comment():
    documented = _documented_vars()
    for name in Settings.model_fields:
        assert name.upper() in documented, f"{name.upper()} missing from .env.example"
    for var, previous in documented.items():
        assert previous.startswith("#") or documented.get(previous.split("=")[0]), f"{var} has no comment"


@pytest.fixture
def restored_environ():
    """load_dotenv writes into os.environ: put it back as it was."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_env_example_copied_verbatim_parses_as_settings(tmp_path, monkeypatch, restored_environ):
    """`.env.example` copied to `.env` unchanged, as the README says; empty values mean unset."""
    for var in _documented_vars():
        monkeypatch.delenv(var, raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_bytes(ENV_EXAMPLE.read_bytes())
    monkeypatch.setenv("HEMAFLOW_ENV_FILE", str(dotenv))
    s = get_settings()
    assert s.image_size == 224
    assert s.hemaflow_home.is_absolute()
    assert s.serving_bundle_path is None  # not Path("."): serving follows the registry
    assert s.airflow_api_url == ""


def test_empty_environment_value_means_default(monkeypatch):
    monkeypatch.setenv("SERVING_BUNDLE_PATH", "")
    monkeypatch.setenv("IMAGE_SIZE", "")
    s = get_settings()
    assert s.serving_bundle_path is None and s.image_size == Settings.model_fields["image_size"].default


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("IMAGE_SIZE", "96")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9999")
    monkeypatch.setenv("THRESHOLD_RULE", "conformal")
    s = get_settings()
    assert s.image_size == 96 and s.s3_port == 9999 and s.threshold_rule == "conformal"


def test_dotenv_file_is_read_but_environment_wins(tmp_path, monkeypatch):
    env = tmp_path / "x.env"
    env.write_text("SERVING_PORT=8123\nBATCH_SIZE=7\n")
    monkeypatch.setenv("HEMAFLOW_ENV_FILE", str(env))
    monkeypatch.delenv("SERVING_PORT", raising=False)
    monkeypatch.setenv("BATCH_SIZE", "9")
    s = get_settings()
    assert s.serving_port == 8123 and s.batch_size == 9
    monkeypatch.delenv("SERVING_PORT", raising=False)


def test_invalid_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("IMAGE_SIZE", "-3")
    with pytest.raises(ValueError, match="image_size"):
        get_settings()
    monkeypatch.setenv("IMAGE_SIZE", "224")
    monkeypatch.setenv("THRESHOLD_RULE", "median")
    with pytest.raises(ValueError, match="threshold_rule"):
        get_settings()


def test_secret_is_not_in_repr():
    s = Settings(aws_secret_access_key="super-secret-value")
    assert "super-secret-value" not in repr(s) and "super-secret-value" not in str(s.model_dump())


def test_inference_tta_reads_its_former_name_too(monkeypatch, restored_environ):
    """INFERENCE_TTA (API and batch screening) was SERVING_TTA: an old .env keeps working; the new name wins."""
    from contracts.settings import Settings

    monkeypatch.delenv("INFERENCE_TTA", raising=False)
    monkeypatch.setenv("SERVING_TTA", "true")
    assert Settings().inference_tta is True
    monkeypatch.setenv("INFERENCE_TTA", "false")
    assert Settings().inference_tta is False
    monkeypatch.delenv("SERVING_TTA")
    assert Settings().inference_tta is False and Settings(inference_tta=True).inference_tta is True
    monkeypatch.delenv("INFERENCE_TTA")
    assert Settings().inference_tta is None  # unset: each model's dataset spec chose (contracts.tta.uses_tta)
    monkeypatch.setenv("INFERENCE_TTA", "")  # as .env.example ships it: empty means unset
    assert Settings().inference_tta is None
