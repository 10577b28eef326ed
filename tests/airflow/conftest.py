"""Fixtures: Airflow deployed as separate processes (ops.airflow_local) on the test stack."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.airflow.site import FAST_TRAINING_ENV, copy_env_example


@pytest.fixture(scope="module")
def hemaflow_env(local_stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """What every Airflow component, task and CLI of the module sees on top of the test stack's
    environment: the user's `.env` (a verbatim copy of .env.example), an empty specs folder
    (the test adds a spec, as a user does) and the fast training configuration."""
    folder = tmp_path_factory.mktemp("hemaflow-user")
    specs = folder / "specs"
    specs.mkdir()
    # The suite's INFERENCE_TTA=false (tests/conftest.py) would reach every component and task through
    # the inherited environment: for this module .env.example decides, as for a user.
    suite_tta = os.environ.pop("INFERENCE_TTA", None)
    yield {**os.environ, "HEMAFLOW_ENV_FILE": str(copy_env_example(folder)), "DATASET_SPECS_DIR": str(specs),
           **FAST_TRAINING_ENV}
    if suite_tta is not None:
        os.environ["INFERENCE_TTA"] = suite_tta


@pytest.fixture(scope="module")
def airflow_stop(local_stack) -> Iterator[None]:
    """Stops every Airflow process of the test stack when the module is done."""
    from ops import airflow_local

    yield
    airflow_local.stop(local_stack)
