"""No guessable secrets: per-install generation, the refusal policy, and where secrets may not go."""

from __future__ import annotations

import re
import stat

import pytest

from contracts import credentials
from contracts.credentials import (
    GENERATED_NAMES,
    WeakSecret,
    check_component,
    init_secrets,
    weakness,
    write_compose_env,
)
from contracts.settings import PROJECT_ROOT, Settings, get_settings

USERNAMES = {"MLFLOW_TRACKING_USERNAME", "SERVING_MLFLOW_USERNAME", "SERVING_S3_ACCESS_KEY_ID"}  # not secret


def _generated_settings(tmp_path) -> Settings:
    path, _ = init_secrets(tmp_path / "secrets.env")
    values = credentials._read(path)
    return Settings(**{k.lower(): v for k, v in values.items()})


@pytest.mark.parametrize("value, why", [
    ("", "empty"), ("change-me-hemaflow-secret", "a placeholder"), ("CHANGE-ME-x" * 3, "a placeholder"),
    ("changeme0123456789abc", "a placeholder"), ("short-secret", "shorter than 16 characters"),
    ("q8Vx0m-3kP_2zLr9WtY7", None),
])
def test_weakness(value, why):
    assert weakness(value) == why


@pytest.mark.parametrize("component", credentials.COMPONENTS)
def test_every_component_refuses_the_defaults_naming_variables_not_values(component):
    s = Settings(aws_secret_access_key="change-me-hemaflow-secret", postgres_password="change-me-postgres-password",
                 airflow_jwt_secret="change-me-airflow-jwt-secret", serving_admin_api_keys="change-me-admin-key")
    with pytest.raises(WeakSecret) as err:
        check_component(component, s)
    message = str(err.value)
    assert "change-me" not in message and "INSECURE_DEMO_SECRETS" in message
    assert re.search(r"[A-Z_]+ (entry #\d+ )?is (empty|a placeholder|shorter)", message)
    check_component(component, s.model_copy(update={"insecure_demo_secrets": True}))  # explicit demo mode


def test_generated_secrets_pass_every_component(tmp_path):
    s = _generated_settings(tmp_path)
    for component in credentials.COMPONENTS:
        check_component(component, s)
    with pytest.raises(WeakSecret, match="AIRFLOW_FERNET_KEY is not a Fernet key"):
        check_component("airflow", s.model_copy(update={"airflow_fernet_key": "x" * 44}))
    with pytest.raises(WeakSecret, match="SERVING_API_KEYS is empty"):
        check_component("serving", s.model_copy(update={"serving_require_api_key": True}))


def test_secrets_file_is_private_complete_idempotent_and_never_rotated(tmp_path):
    path = tmp_path / "home" / "secrets.env"
    path.parent.mkdir()
    path.write_text("AWS_SECRET_ACCESS_KEY=mine-kept-as-is-0123456789\n")
    _, added = init_secrets(path)
    assert set(added) == set(GENERATED_NAMES) - {"AWS_SECRET_ACCESS_KEY"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = credentials._read(path)
    assert first["AWS_SECRET_ACCESS_KEY"] == "mine-kept-as-is-0123456789"
    assert init_secrets(path) == (path, []) and credentials._read(path) == first
    other = tmp_path / "other.env"
    init_secrets(other)
    assert credentials._read(other)["MLFLOW_TRACKING_PASSWORD"] != first["MLFLOW_TRACKING_PASSWORD"]  # per install
    from contracts.signing import public_key_of

    assert first["BUNDLE_TRUSTED_PUBLIC_KEYS"] == public_key_of(first["BUNDLE_SIGNING_KEY"])


def test_settings_fill_unset_or_empty_variables_from_the_secrets_file(tmp_path, monkeypatch):
    secrets_path, _ = init_secrets(tmp_path / "secrets.env")
    values = credentials._read(secrets_path)
    dotenv = tmp_path / ".env"  # .env.example copied verbatim: secrets present but empty
    dotenv.write_text("AWS_SECRET_ACCESS_KEY=\nSERVING_MLFLOW_PASSWORD=\n")
    monkeypatch.setenv("HEMAFLOW_ENV_FILE", str(dotenv))
    monkeypatch.setenv("HEMAFLOW_SECRETS_FILE", str(secrets_path))
    for name in GENERATED_NAMES:
        monkeypatch.setenv(name, "")  # empty = unset; monkeypatch restores what get_settings fills in
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-environment-0123456789")
    s = get_settings()
    assert s.aws_secret_access_key.get_secret_value() == values["AWS_SECRET_ACCESS_KEY"]
    assert s.serving_mlflow_password.get_secret_value() == values["SERVING_MLFLOW_PASSWORD"]
    assert s.mlflow_tracking_password.get_secret_value() == "from-the-environment-0123456789"  # env wins
    monkeypatch.setenv("HEMAFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("HEMAFLOW_SECRETS_FILE")
    from contracts.settings import secrets_file_path

    assert secrets_file_path() == tmp_path / "secrets.env"  # default: HEMAFLOW_HOME/secrets.env


def test_init_finds_the_home_that_dotenv_sets(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"HEMAFLOW_HOME={tmp_path / 'elsewhere'}\n")
    monkeypatch.setenv("HEMAFLOW_ENV_FILE", str(dotenv))
    monkeypatch.delenv("HEMAFLOW_SECRETS_FILE")
    monkeypatch.setenv("HEMAFLOW_HOME", "recorded")  # so that monkeypatch restores what .env sets
    monkeypatch.delenv("HEMAFLOW_HOME")  # unset, as for `make demo` without an exported home
    path, added = init_secrets()
    assert path == tmp_path / "elsewhere" / "secrets.env" and path.is_file() and added


def test_make_env_fills_empty_secrets_and_keeps_what_is_set(tmp_path):
    secrets_path = tmp_path / "secrets.env"
    target = tmp_path / ".env"
    _, filled = write_compose_env(target, secrets_path)
    values = credentials._read(secrets_path)
    env = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", target.read_text(), flags=re.M))
    example = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", (PROJECT_ROOT / ".env.example").read_text(), flags=re.M))
    assert set(env) == set(example) and stat.S_IMODE(target.stat().st_mode) == 0o600
    for name in GENERATED_NAMES:
        assert env[name] == values[name] and name in filled
    assert {k: v for k, v in env.items() if k not in GENERATED_NAMES} == \
        {k: v for k, v in example.items() if k not in GENERATED_NAMES}
    target.write_text(target.read_text().replace(f"POSTGRES_PASSWORD={values['POSTGRES_PASSWORD']}",
                                                 "POSTGRES_PASSWORD=my-own-postgres-password-123"))
    _, filled = write_compose_env(target, secrets_path)
    assert filled == [] and "POSTGRES_PASSWORD=my-own-postgres-password-123" in target.read_text()


def test_env_example_and_defaults_carry_no_secret_values():
    example = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", (PROJECT_ROOT / ".env.example").read_text(), flags=re.M))
    for name in GENERATED_NAMES:
        assert example[name] == "", f"{name} must be empty in .env.example (generated per install)"
    for path in (".env.example", "docker-compose.yml", "contracts/settings.py"):
        text = (PROJECT_ROOT / path).read_text().lower()
        assert not re.search(r"[=:(\"' ]\s*[\"']?change-me-", text), path  # no placeholder value anywhere
    for field, info in Settings.model_fields.items():
        if hasattr(info.default, "get_secret_value"):
            assert info.default.get_secret_value() == "", f"{field} has a default secret"


def test_secrets_never_in_reprs_or_dumps(tmp_path):
    s = _generated_settings(tmp_path)
    shown = repr(s) + str(s.model_dump()) + s.model_dump_json()
    for name, value in credentials._read(tmp_path / "secrets.env").items():
        if name not in USERNAMES and name != "BUNDLE_TRUSTED_PUBLIC_KEYS":  # public keys are public
            assert value not in shown, name


def test_serving_refuses_to_start_with_a_guessable_admin_key(tmp_path):
    from serving.app import create_app

    with pytest.raises(WeakSecret, match="SERVING_ADMIN_API_KEYS entry #2 is shorter"):
        create_app(Settings(serving_bundle_path=tmp_path, serving_admin_api_keys="q8Vx0m-3kP_2zLr9WtY7,admin"))
    with pytest.raises(WeakSecret, match="SERVING_MLFLOW_PASSWORD is empty"):
        create_app(Settings(serving_mlflow_password=""))  # registry mode needs its read-only MLflow identity


def test_reviewer_keys_are_checked_without_their_names(tmp_path):
    from serving.app import create_app
    from serving.deps import reviewer_keys

    with pytest.raises(WeakSecret, match="SERVING_REVIEWER_API_KEYS entry #2 is shorter"):
        create_app(Settings(serving_bundle_path=tmp_path, serving_reviewer_api_keys="ann:q8Vx0m-3kP_2zLr9WtY7,bob:pw"))
    s = Settings(serving_bundle_path=tmp_path, serving_reviewer_api_keys="ann:q8Vx0m-3kP_2zLr9WtY7,Zr4-q8Vx0m3kP2zLr9")
    create_app(s)  # long keys behind short names are fine
    keys = reviewer_keys(s)
    assert keys["q8Vx0m-3kP_2zLr9WtY7"] == "ann" and keys["Zr4-q8Vx0m3kP2zLr9"].startswith("key-")


def test_stack_refuses_guessable_secrets_before_starting_anything(tmp_path):
    from ops import stack

    s = Settings(hemaflow_home=tmp_path, aws_secret_access_key="change-me-hemaflow-secret")
    with pytest.raises(WeakSecret, match="AWS_SECRET_ACCESS_KEY is a placeholder"):
        stack.up(s)
    assert not (tmp_path / "stack").exists()
