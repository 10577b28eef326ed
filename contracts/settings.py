"""The one typed settings object for HemaFlow.

Every stage, the DAGs and the serving container read their configuration through
`get_settings()`, called inside functions (never at import time) so that tests and
Airflow tasks see the environment as it is when they run. Values come from the
process environment first, then from `.env` (loaded by python-dotenv), then from the
per-install secrets file `HEMAFLOW_HOME/secrets.env` that `make demo` / `make env`
generate (it only fills variables that are still unset or empty), then from the
defaults below. Every field is documented in `.env.example`.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from dotenv import dotenv_values, load_dotenv
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# Stain normalisation modes (training.model.STAIN_NORMALISATIONS); Settings and spec [training] tables share it.
StainNormalisation = Literal["none", "per_image"]
# How the binary decision threshold is read off validation (training.evaluate.choose_threshold).
ThresholdRule = Literal["validation", "conformal", "quantile"]


class Settings(BaseSettings):
    """HemaFlow configuration; field names map to upper-case environment variables."""

    # An empty value (`SERVING_BUNDLE_PATH=` in a copied .env.example) means "unset": the default.
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_ignore_empty=True)

    # --- local state -------------------------------------------------------------------
    hemaflow_home: Path = Field(PROJECT_ROOT / ".hemaflow", description="Local data, cache and logs")

    # --- object storage (S3 API) -------------------------------------------------------
    s3_endpoint_url: str = "http://127.0.0.1:8333"
    s3_bucket: str = "hemaflow"
    s3_region: str = "us-east-1"
    aws_access_key_id: str = "hemaflow"
    aws_secret_access_key: SecretStr = SecretStr("")
    s3_max_attempts: int = Field(4, ge=1, description="Attempts per S3 call, with exponential backoff")
    s3_connect_timeout_s: float = Field(3.0, gt=0)
    s3_read_timeout_s: float = Field(30.0, gt=0)
    transfer_workers: int = Field(16, ge=1, description="Parallel uploads/downloads")

    # --- MLflow ------------------------------------------------------------------------
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_artifacts_prefix: str = "mlflow-artifacts"
    # MLflow's basic-auth identities (MLflow's own client reads the first pair from the environment).
    mlflow_tracking_username: str = Field("", description="Pipeline identity: writes runs and models")
    mlflow_tracking_password: SecretStr = SecretStr("")
    serving_mlflow_username: str = Field("", description="Serving identity: read-only")
    serving_mlflow_password: SecretStr = SecretStr("")
    mlflow_admin_password: SecretStr = Field(SecretStr(""), description="MLflow server only: user management")
    mlflow_flask_secret_key: SecretStr = Field(SecretStr(""), description="MLflow server only: CSRF key")

    # --- datasets ----------------------------------------------------------------------
    dataset: str = "leukemia"
    dataset_specs_dir: Path = PROJECT_ROOT / "pipeline" / "specs"

    # --- validation --------------------------------------------------------------------
    allowed_formats: str = "JPEG,PNG,TIFF,BMP"
    min_image_side: int = Field(32, ge=1)
    max_image_side: int = Field(8192, ge=1)
    min_file_bytes: int = Field(100, ge=1)
    max_file_bytes: int = Field(20_000_000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb guard")
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    min_images_per_class: int = Field(5, ge=1)
    max_class_imbalance: float = Field(10.0, ge=1, description="Largest class / smallest class")
    min_dataset_rows: int = Field(10, ge=1)

    # --- preprocessing and splits ------------------------------------------------------
    image_size: int = Field(224, ge=16, le=1024)
    shard_size: int = Field(4, ge=1, description="Images per TFRecord shard (about: content buckets)")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    split_salt: str = "hemaflow-v1"

    # --- training ----------------------------------------------------------------------
    seed: int = 1337
    epochs: int = Field(14, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    lr_schedule: Literal["cosine", "plateau"] = Field(
        "cosine", description="Learning-rate schedule (training.schedule): warm-up + cosine decay over EPOCHS, "
        "or constant and halved on val_loss plateaus")
    model_width: int = Field(16, ge=4, description="Filters of the first conv block")
    model_depth: int = Field(5, ge=2, le=8, description="Conv blocks, each halving resolution")
    model_ensemble_size: int = Field(
        1, ge=1, le=4, description="Networks trained one after another (seeds SEED, SEED+1, ...) and served as "
        "one model whose logits are their mean (training.model.assemble_ensemble); each costs a full fit")
    train_input_size: int = Field(96, ge=16, le=1024, description="Network input side")
    model_stain_normalisation: StainNormalisation = Field(
        "none", description="Stain normalisation inside the network (training.model.STAIN_NORMALISATIONS): "
        "per_image standardises each channel of each image, so serving applies it too")
    early_stopping_patience: int = Field(6, ge=1)
    early_stopping_start_epoch: int = Field(6, ge=0, description="0-based epoch from which early stopping "
                                            "watches val_loss (warm-up before it; training.stopping)")
    train_colour_strength: float = Field(1.0, ge=0, le=3, description="Scale of the colour/stain jitter")
    train_time_budget_s: float = Field(840.0, gt=0, description="Wall-clock budget for fit()")
    target_sensitivity: float = Field(0.98, gt=0, le=1)
    threshold_rule: ThresholdRule = Field(
        "validation", description="validation: the highest threshold reaching TARGET_SENSITIVITY on validation "
        "(on unseen images a little below it on average); conformal: split-conformal, so an unseen positive "
        "is missed with probability <= 1 - TARGET_SENSITIVITY; quantile: aimed at TARGET_SENSITIVITY itself on "
        "unseen images (training.evaluate.choose_threshold)")
    canary_count: int = Field(4, ge=1)
    model_quantization: Literal["dynamic_int8", "none"] = Field(
        "dynamic_int8", description="How model.tflite stores its weights (contracts.bundle QUANTIZATION_*); "
        "dynamic_int8 is shipped only when it agrees with the float model on validation (training.bundle)")
    warm_start: bool = Field(False, description="Start a candidate from the champion's weights when labels and "
                             "architecture match (training/warm_start.py)")

    # --- promotion gate ----------------------------------------------------------------
    gate_min_balanced_accuracy: float = Field(0.80, ge=0, le=1)
    gate_min_sensitivity: float = Field(0.90, ge=0, le=1)
    gate_min_accuracy: float = Field(0.80, ge=0, le=1)
    gate_margin: float = Field(0.0, ge=0, le=1, description="Candidate must beat champion by this")
    model_name_prefix: str = "hemaflow"

    # --- drift (contracts.drift): a batch or dataset version against the champion's training profile ---
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="Significance level of each drift test")
    drift_min_effect: float = Field(0.5, gt=0, description="Colour drift needs |standardised mean diff| >= this")
    drift_strong_effect: float = Field(1.5, gt=0, description="|standardised mean diff| marking a strong drift")
    drift_min_images: int = Field(20, ge=2, description="Fewer images than this: drift is not tested")
    drift_permutations: int = Field(200, ge=20, description="Permutations of the feature MMD test")

    # --- serving -----------------------------------------------------------------------
    serving_host: str = "127.0.0.1"
    serving_port: int = Field(8000, ge=1, le=65535)
    serving_url: str = "http://127.0.0.1:8000"
    serving_bundle_path: Path | None = None
    serving_poll_interval_s: float = Field(30.0, ge=0)
    serving_admin_api_keys: SecretStr = SecretStr("")
    serving_require_api_key: bool = False
    serving_api_keys: SecretStr = SecretStr("")
    serving_reviewer_api_keys: SecretStr = Field(
        SecretStr(""), description="Comma-separated `name:key` (or bare key) entries of the review queue; empty = off")
    serving_s3_access_key_id: str = Field("hemaflow-serving", description="Serving's own S3 identity (review queue)")
    serving_s3_secret_access_key: SecretStr = Field(
        SecretStr(""), description="Its secret; empty = the review queue is off (503). Scope: contracts.screening")
    serving_max_upload_bytes: int = Field(10_000_000, ge=1)
    serving_max_batch: int = Field(16, ge=1)
    serving_micro_batch: int = Field(1, ge=1, description="Most queued images per interpreter call (1 = off)")
    serving_inference_threads: int = Field(0, ge=0, le=64, description="Threads per worker that decode and run "
                                           "the model, each with its own interpreter (0 = cores / workers)")
    serving_workers: int = Field(1, ge=1, le=32, description="uvicorn worker processes")
    serving_refuse_out_of_scope: bool = Field(True, description="Answer in_scope=false and no label when the "
                                              "bundle's detector fires (false: label it and flag it)")
    # Test-time augmentation in the API AND batch screening (contracts.tta); SERVING_TTA, its name
    # before batch screening followed it, is still read. None (unset or empty): each model's own
    # default, its dataset spec's `inference_tta` (contracts.tta.uses_tta).
    inference_tta: bool | None = Field(None, validation_alias=AliasChoices("inference_tta", "serving_tta"),
                                       description="Average probabilities over flips and 90-degree rotations "
                                                   "(unset: each dataset spec's choice)")

    # --- signed bundles and secrets policy -----------------------------------------------
    bundle_signing_key: SecretStr = Field(SecretStr(""), description="Ed25519 private key (base64) training signs with")
    bundle_trusted_public_keys: str = Field("", description="Comma-separated base64 Ed25519 keys serving accepts")
    insecure_demo_secrets: bool = Field(False, description="Accept empty/placeholder secrets (throw-away demo only)")

    # --- Airflow -----------------------------------------------------------------------
    retrain_schedule: str = "@weekly"
    raw_watch_schedule: str = Field("*/10 * * * *", description="How often new raw images are looked for")
    train_queue: str = Field("default", min_length=1,
                             description="Celery queue of the train task (give training its own worker)")
    airflow_port: int = Field(8080, ge=1, le=65535)
    airflow_api_url: str = Field("", description="api-server base URL for upload asset events; empty = off")
    airflow_api_username: str = "admin"
    airflow_api_password: SecretStr = SecretStr("")
    score_chunk_size: int = Field(64, ge=1, description="Images per mapped scoring task of hemaflow_score_<dataset>")

    # --- docker-compose only (checked by `python -m pipeline secrets check`) ---------------
    postgres_password: SecretStr = SecretStr("")
    airflow_jwt_secret: SecretStr = SecretStr("")
    airflow_fernet_key: SecretStr = SecretStr("")

    @field_validator("hemaflow_home", "dataset_specs_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value if value.is_absolute() else (PROJECT_ROOT / value).resolve()

    @field_validator("bundle_trusted_public_keys", mode="after")
    @classmethod
    def _trusted_keys_parse(cls, value: str) -> str:
        """A malformed pinned key is a start-up error, not a silently smaller trust set."""
        for i, item in enumerate(part.strip() for part in value.split(",") if part.strip()):
            try:
                raw = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"BUNDLE_TRUSTED_PUBLIC_KEYS entry #{i + 1} is not base64 of a 32-byte Ed25519 key")
        return value

    # --- derived values ------------------------------------------------------------------
    @property
    def s3_port(self) -> int:
        return _port_of(self.s3_endpoint_url, 8333)

    @property
    def mlflow_port(self) -> int:
        return _port_of(self.mlflow_tracking_uri, 5000)

    @property
    def allowed_format_set(self) -> frozenset[str]:
        return frozenset(f.strip().upper() for f in self.allowed_formats.split(",") if f.strip())

    def model_name(self, dataset: str | None = None) -> str:
        """Registered-model name for a dataset, e.g. ``hemaflow-leukemia``."""
        return f"{self.model_name_prefix}-{dataset or self.dataset}"

    def key_list(self, secret: SecretStr) -> list[str]:
        return [k.strip() for k in secret.get_secret_value().split(",") if k.strip()]


def _port_of(url: str, default: int) -> int:
    return urlparse(url).port or default


SECRETS_FILE_NAME = "secrets.env"


def secrets_file_path() -> Path | None:
    """The per-install secrets dotenv: `HEMAFLOW_SECRETS_FILE`, else `HEMAFLOW_HOME/secrets.env`
    ("" = none; tests use this to stay hermetic)."""
    given = os.environ.get("HEMAFLOW_SECRETS_FILE")
    if given is not None:
        return Path(given) if given else None
    home = Path(os.environ.get("HEMAFLOW_HOME") or ".hemaflow")
    return (home if home.is_absolute() else PROJECT_ROOT / home) / SECRETS_FILE_NAME


def load_secrets_file() -> None:
    """Fill variables that are unset *or empty* from the secrets file: `.env.example` copied verbatim
    leaves every secret empty, and the generated per-install value must still win over that."""
    path = secrets_file_path()
    if path is None or not path.is_file():
        return
    for key, value in dotenv_values(path).items():
        if value and not os.environ.get(key):
            os.environ[key] = value


def get_settings(**overrides: object) -> Settings:
    """Load settings from the environment, `.env`, then the secrets file (earlier sources win).

    `HEMAFLOW_ENV_FILE` points at another dotenv file (tests use this to stay hermetic).
    """
    env_file = os.environ.get("HEMAFLOW_ENV_FILE", str(PROJECT_ROOT / ".env"))
    if env_file and Path(env_file).is_file():
        load_dotenv(env_file, override=False)
    load_secrets_file()
    return Settings(**overrides)  # type: ignore[arg-type]
