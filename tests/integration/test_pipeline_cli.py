"""`python -m pipeline upload|ingest|validate|preprocess|run` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEMAFLOW_ENV_FILE": "", "DATASET_SPECS_DIR": str(settings.dataset_specs_dir),
           "HEMAFLOW_HOME": str(settings.hemaflow_home), "IMAGE_SIZE": str(settings.image_size),
           "MIN_IMAGES_PER_CLASS": "3", "MIN_DATASET_ROWS": "6", "MIN_FILE_BYTES": "20"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_stages_and_run(tiny_dataset_factory, tmp_path):
    settings, dataset, root = tiny_dataset_factory({"neg": 6, "pos": 6})
    settings = settings.model_copy(update={"hemaflow_home": tmp_path / "home"})
    (root / "README.txt").write_text("not a class folder")

    up = _cli(settings, "upload", str(root), "--dataset", dataset)
    assert up.returncode == 0, up.stderr
    assert "12 uploaded" in up.stdout and "README.txt" in up.stdout

    ing = _cli(settings, "ingest", "--dataset", dataset)
    assert ing.returncode == 0, ing.stderr
    assert "12 objects (12 new" in ing.stdout

    val = _cli(settings, "validate", "--dataset", dataset)
    assert val.returncode == 0, val.stderr
    assert "12 images kept, 0 quarantined" in val.stdout

    run = _cli(settings, "run", "--dataset", dataset)
    assert run.returncode == 0, run.stderr
    assert "unchanged: reused the previous manifest" in run.stdout
    assert "written" in run.stdout and f"done     {dataset} version" in run.stdout

    again = _cli(settings, "run", "--dataset", dataset)
    assert "already exists: nothing to do" in again.stdout

    bad = _cli(settings, "ingest", "--dataset", "no-such-dataset")
    assert bad.returncode == 1 and "error: SpecError: no dataset spec 'no-such-dataset'" in bad.stderr
    assert "Traceback" not in bad.stderr
