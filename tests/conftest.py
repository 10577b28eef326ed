"""Shared fixtures: a hermetic environment and a real local stack on free ports.

`local_stack` starts a real SeaweedFS and a real MLflow server (the same code as
`python -m pipeline stack up`) in a temporary folder, once per test session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ops.stack import private_stack_env
from tests.helpers import patched_environ

pytest_plugins = ["tests.fixtures.data", "tests.fixtures.training"]

# Tests never read a developer's .env or generated per-install secrets.
os.environ["HEMAFLOW_ENV_FILE"] = ""
os.environ["HEMAFLOW_SECRETS_FILE"] = ""
# Served probabilities are compared with the bundles' canaries (un-augmented); the tests of test-time
# augmentation turn it on, and the Airflow tests take the user's .env (tests/airflow/conftest.py).
os.environ["INFERENCE_TTA"] = "false"


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for a private stack: temp home, free ports, random credentials."""
    from tests.fixtures.keys import PUBLIC_KEY, SIGNING_KEY

    env = private_stack_env(tmp_path_factory.mktemp("hemaflow-home"), bucket="hemaflow-test")
    env["S3_MAX_ATTEMPTS"] = "2"
    # One session key pair: bundles trained on the stack and built by fixtures verify alike.
    env["BUNDLE_SIGNING_KEY"], env["BUNDLE_TRUSTED_PUBLIC_KEYS"] = SIGNING_KEY, PUBLIC_KEY
    with patched_environ(env):
        yield env


@pytest.fixture(scope="session")
def local_stack(stack_env: dict[str, str]):
    """A running SeaweedFS + MLflow; yields the Settings pointing at them."""
    from ops import stack
    from contracts.settings import get_settings

    settings = get_settings()
    stack.up(settings)
    # MLflow clients in this process talk to the test server.
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    try:
        yield settings
    finally:
        stack.down(settings)


@pytest.fixture
def s3(local_stack):
    from pipeline.storage import s3_client

    return s3_client(local_stack)
