"""Per-install secrets and the policy that refuses guessable ones.

`init_secrets` generates every secret HemaFlow needs once per install into
`HEMAFLOW_HOME/secrets.env` (owner-only; existing values are never rotated), which
`get_settings()` uses to fill variables that are unset or empty. `write_compose_env` turns the
same values into a ready `.env` for docker compose. `check_component` is what each component
calls before it starts: empty, placeholder (`change-me...`) and short secrets are refused,
unless `INSECURE_DEMO_SECRETS=true` (an explicit, throw-away demo mode). Errors name the
variables, never their values.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.fernet import Fernet
from dotenv import dotenv_values

from contracts.common import write_private_file
from contracts.settings import PROJECT_ROOT, Settings, get_settings, secrets_file_path
from contracts.signing import generate_key_pair, load_private_key, public_key_of

MIN_SECRET_CHARS = 16
PLACEHOLDER_PREFIXES = ("change-me", "changeme", "change_me")
PIPELINE_MLFLOW_USER = "hemaflow-pipeline"
SERVING_MLFLOW_USER = "hemaflow-serving"
SERVING_S3_USER = "hemaflow-serving"  # serving's SeaweedFS access key id (not secret)

# Which secrets each component needs (Settings field names).
COMPONENT_SECRETS: dict[str, tuple[str, ...]] = {
    "s3": ("aws_secret_access_key", "serving_s3_secret_access_key"),
    "mlflow-server": ("aws_secret_access_key", "mlflow_admin_password", "mlflow_flask_secret_key",
                      "mlflow_tracking_password", "serving_mlflow_password"),
    "pipeline": ("aws_secret_access_key", "mlflow_tracking_password", "bundle_signing_key"),
    "airflow": ("aws_secret_access_key", "mlflow_tracking_password", "bundle_signing_key",
                "airflow_jwt_secret", "airflow_fernet_key", "postgres_password"),
    "postgres": ("postgres_password",),
    "serving": ("serving_mlflow_password",),  # plus its API keys: see check_component
}
COMPONENTS = tuple(COMPONENT_SECRETS) + ("compose",)


class WeakSecret(ValueError):
    """A secret is empty, a placeholder or too short; the message names variables, not values."""


def _token() -> str:
    return secrets.token_urlsafe(32)


def _fernet_key() -> str:
    return Fernet.generate_key().decode()


# Environment variable -> generator. Usernames are not secret, but they belong to the identities.
GENERATORS: dict[str, Callable[[], str]] = {
    "AWS_SECRET_ACCESS_KEY": _token,
    "SERVING_S3_ACCESS_KEY_ID": lambda: SERVING_S3_USER,
    "SERVING_S3_SECRET_ACCESS_KEY": _token,
    "MLFLOW_TRACKING_USERNAME": lambda: PIPELINE_MLFLOW_USER,
    "MLFLOW_TRACKING_PASSWORD": _token,
    "SERVING_MLFLOW_USERNAME": lambda: SERVING_MLFLOW_USER,
    "SERVING_MLFLOW_PASSWORD": _token,
    "MLFLOW_ADMIN_PASSWORD": _token,
    "MLFLOW_FLASK_SECRET_KEY": _token,
    "SERVING_ADMIN_API_KEYS": _token,
    "SERVING_REVIEWER_API_KEYS": _token,
    "POSTGRES_PASSWORD": _token,
    "AIRFLOW_JWT_SECRET": _token,
    "AIRFLOW_FERNET_KEY": _fernet_key,
}
KEY_PAIR = ("BUNDLE_SIGNING_KEY", "BUNDLE_TRUSTED_PUBLIC_KEYS")
GENERATED_NAMES = tuple(GENERATORS) + KEY_PAIR
# What a local stack (SeaweedFS + MLflow with its users) and the pipeline and serving need.
STACK_NAMES = ("AWS_SECRET_ACCESS_KEY", "SERVING_S3_ACCESS_KEY_ID", "SERVING_S3_SECRET_ACCESS_KEY",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "SERVING_MLFLOW_USERNAME", "SERVING_MLFLOW_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
               "MLFLOW_FLASK_SECRET_KEY") + KEY_PAIR


# --- policy ---------------------------------------------------------------------------------------
def weakness(value: str) -> str | None:
    """Why a secret is guessable, or None."""
    if not value:
        return "empty"
    if value.strip().lower().startswith(PLACEHOLDER_PREFIXES):
        return "a placeholder"
    if len(value) < MIN_SECRET_CHARS:
        return f"shorter than {MIN_SECRET_CHARS} characters"
    return None


def _fernet_problem(value: str) -> str | None:
    try:
        Fernet(value.encode())
    except (ValueError, TypeError):
        return "not a Fernet key (url-safe base64 of 32 bytes)"
    return None


def problems(settings: Settings, fields: Iterable[str]) -> list[str]:
    """'VARIABLE is <why>' for every weak secret among `fields` (Settings field names)."""
    found = []
    for field in fields:
        value = getattr(settings, field)
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        why = weakness(text)
        if why is None and field == "airflow_fernet_key":
            why = _fernet_problem(text)
        if why is None and field == "bundle_signing_key":
            why = _signing_key_problem(text)
        if why:
            found.append(f"{field.upper()} is {why}")
    return found


def _signing_key_problem(value: str) -> str | None:
    try:
        load_private_key(value)
    except ValueError as exc:
        return f"unusable ({exc})"
    return None


def _serving_problems(s: Settings) -> list[str]:
    found = problems(s, ("serving_mlflow_password",)) if s.serving_bundle_path is None else []
    if s.serving_s3_secret_access_key.get_secret_value():  # empty: no review queue (it answers 503)
        found += problems(s, ("serving_s3_secret_access_key",))
    for field in ("serving_admin_api_keys", "serving_api_keys", "serving_reviewer_api_keys"):
        keys = s.key_list(getattr(s, field))
        if field == "serving_reviewer_api_keys":
            keys = [k.split(":", 1)[-1] for k in keys]  # `name:key`: only the key is secret
        if field == "serving_api_keys" and s.serving_require_api_key and not keys:
            found.append("SERVING_API_KEYS is empty while SERVING_REQUIRE_API_KEY=true")
        found += [f"{field.upper()} entry #{i + 1} is {why}" for i, k in enumerate(keys) if (why := weakness(k))]
    return found


def check_component(component: str, settings: Settings | None = None) -> None:
    """Refuse to start `component` with guessable secrets (WeakSecret), unless demo mode is explicit."""
    s = settings or get_settings()
    if component == "compose":
        fields = sorted({f for c in ("s3", "mlflow-server", "airflow", "serving") for f in COMPONENT_SECRETS[c]})
        found = problems(s, fields) + _serving_problems(s)
    elif component == "serving":
        found = _serving_problems(s)
    else:
        found = problems(s, COMPONENT_SECRETS[component])
    if found and not s.insecure_demo_secrets:
        raise WeakSecret(
            f"{component} refuses guessable secrets: " + "; ".join(found) + ". Generate per-install secrets with "
            "`make secrets` (python -m pipeline secrets init; HEMAFLOW_HOME/secrets.env) or `make env` for "
            "docker compose; INSECURE_DEMO_SECRETS=true accepts them for a throw-away demo"
        )


# --- generation -------------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, str]:
    return {k: v for k, v in dotenv_values(path).items() if v} if path.is_file() else {}


def generate_missing(values: dict[str, str]) -> dict[str, str]:
    """`values` completed with a fresh value for every generated name it lacks (nothing is replaced)."""
    out = dict(values)
    for name, make in GENERATORS.items():
        out.setdefault(name, make())
    if "BUNDLE_SIGNING_KEY" not in out:
        out["BUNDLE_SIGNING_KEY"], public = generate_key_pair()
        out["BUNDLE_TRUSTED_PUBLIC_KEYS"] = ",".join(filter(None, [out.get("BUNDLE_TRUSTED_PUBLIC_KEYS"), public]))
    out.setdefault("BUNDLE_TRUSTED_PUBLIC_KEYS", public_key_of(out["BUNDLE_SIGNING_KEY"]))
    return out


def stack_secrets() -> dict[str, str]:
    """Fresh random values for a throw-away stack (tests, benchmarks): STACK_NAMES only."""
    return {k: v for k, v in generate_missing({}).items() if k in STACK_NAMES}


def init_secrets(path: Path | None = None) -> tuple[Path | None, list[str]]:
    """Create or complete the per-install secrets file; returns (path, names generated now).
    (None, []) when HEMAFLOW_SECRETS_FILE is empty: the environment supplies every secret."""
    if path is None:
        get_settings()  # loads .env first: it may set HEMAFLOW_HOME, which locates the file
        path = secrets_file_path()
    if path is None:
        return None, []
    existing = _read(path)
    complete = generate_missing(existing)
    added = [name for name in complete if name not in existing]
    if added:
        header = ("# HemaFlow per-install secrets, generated once (never committed, owner-only).\n"
                  "# get_settings() fills unset or empty variables from this file; .env and the environment win.\n")
        write_private_file(path, header + "".join(f"{k}={v}\n" for k, v in sorted(complete.items())))
    return path, added


def write_compose_env(target: Path | None = None, secrets_path: Path | None = None) -> tuple[Path, list[str]]:
    """A ready `.env` for docker compose: the existing one (else `.env.example`) with every empty
    generated variable filled from the per-install secrets. Returns (path, names filled)."""
    target = target or PROJECT_ROOT / ".env"
    source_path, _ = init_secrets(secrets_path)
    if source_path is None:
        raise WeakSecret("HEMAFLOW_SECRETS_FILE is empty: there are no generated secrets to write")
    values = _read(source_path)
    template = target if target.is_file() else PROJECT_ROOT / ".env.example"
    filled: list[str] = []
    lines = []
    for line in template.read_text().splitlines():
        m = re.match(r"^([A-Z0-9_]+)=\s*$", line)
        if m and m.group(1) in values:
            line = f"{m.group(1)}={values[m.group(1)]}"
            filled.append(m.group(1))
        lines.append(line)
    write_private_file(target, "\n".join(lines) + "\n")
    return target, filled
