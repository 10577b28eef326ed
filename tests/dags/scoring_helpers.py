"""Helpers of the batch-scoring DAG tests: the tiny champion's dataset with a spec and its DAG,
running it with `dag.test()`, reading results back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fixtures.data import write_spec
from tests.fixtures.training import TINY_CLASSES, TINY_LABELS


@contextmanager
def scoring_dag(model: dict, specs_dir: Path, chunk_size: int) -> Iterator[dict]:
    """{dataset, settings, dag, model}: `hemaflow_score_<dataset>` of the tiny champion (`model`,
    the `tiny_registered_model` fixture), scoring in chunks of `chunk_size`."""
    from airflow.dag_processing.dagbag import DagBag

    from contracts.settings import get_settings
    from tests.dags.airflow_home import DAGS_DIR

    dataset = model["dataset"]
    write_spec(specs_dir, dataset, TINY_CLASSES, positive_label="abnormal")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATASET_SPECS_DIR", str(specs_dir))
        mp.setenv("SCORE_CHUNK_SIZE", str(chunk_size))
        mp.setenv("SERVING_URL", "http://serving.test:8000")
        mp.setenv("MLFLOW_TRACKING_URI", model["settings"].mlflow_tracking_uri)
        dag = DagBag(dag_folder=str(DAGS_DIR)).dags[f"hemaflow_score_{dataset}"]
        yield {"dataset": dataset, "settings": get_settings(), "dag": dag, "model": model}


def run_dag(dag, conf: dict | None = None):
    """(dag run, {(task_id, map_index): state}) of one `dag.test()` run."""
    dag_run = dag.test(run_conf=conf or {})
    return dag_run, {(ti.task_id, ti.map_index): str(ti.state) for ti in dag_run.get_task_instances()}


def s3_bytes(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def write_batch_folder(folder: Path, images, labels: list[int]) -> Path:
    """Generated uint8 images as lossless PNGs in one folder per label (pixels as generated)."""
    from PIL import Image

    for i, (image, k) in enumerate(zip(images, labels)):
        (folder / TINY_LABELS[k]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / TINY_LABELS[k] / f"{i:03d}.png")
    return folder
