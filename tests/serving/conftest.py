"""Serving-test fixtures: real bundles (from training's exporter) and real uvicorn servers.

Servers are `python -m serving` subprocesses on free ports, so tests exercise the same
process, sockets and lifespan as production; each is stopped by its fixture.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.keys import OTHER_SIGNING_KEY, SIGNING_KEY
from tests.serving.support import ServingProcess, forge, point_link, resum


@pytest.fixture(scope="session")
def serving_bundles(tiny_bundle_dir: Path, tiny_keras_model, tmp_path_factory) -> dict[str, Path]:
    """good (training's tiny bundle), good2 (same model, another dataset version),
    tampered (model bytes changed, stale checksums), bad_canary (checksums fine, canary wrong);
    forgeries with self-consistent checksums: unsigned (no signature), forged_other_key (signed by
    a key serving does not trust) and forged_stale_sig (the genuine signature of other checksums).
    Every bundle but the forgeries is signed with the session key."""
    from tests.fixtures.training import TINY_CLASSES, TINY_LABELS, TINY_SIZE
    from training.bundle import export_bundle

    base = tmp_path_factory.mktemp("serving-bundles")
    model, images, labels = tiny_keras_model
    good2 = base / "good2"
    export_bundle(
        model, good2, dataset="tiny", dataset_version="tiny-v2", labels=TINY_LABELS, classes=TINY_CLASSES,
        image_size=TINY_SIZE, canary_images=images[4:6], canary_labels=[TINY_LABELS[k] for k in labels[4:6]],
        positive_label="abnormal", threshold=0.5, metrics={"accuracy": 1.0}, run_id="local-test-2",
        model_name="hemaflow-tiny", git_commit="test", signing_key=SIGNING_KEY,
    )
    tampered = base / "tampered"
    shutil.copytree(tiny_bundle_dir, tampered)
    blob = bytearray((tampered / "model.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tampered / "model.tflite").write_bytes(bytes(blob))
    bad_canary = base / "bad_canary"
    shutil.copytree(tiny_bundle_dir, bad_canary)
    meta = json.loads((bad_canary / "bundle.json").read_text())
    meta["canaries"][0]["probabilities"] = [0.5] * len(meta["labels"])
    (bad_canary / "bundle.json").write_text(json.dumps(meta))
    resum(bad_canary)
    forged = {"threshold": 0.01}  # a forger's edit: call nearly everything abnormal
    return {
        "good": tiny_bundle_dir, "good2": good2, "tampered": tampered, "bad_canary": bad_canary,
        "unsigned": forge(tiny_bundle_dir, base / "unsigned", "", **forged),
        "forged_other_key": forge(tiny_bundle_dir, base / "forged_other_key", OTHER_SIGNING_KEY, **forged),
        "forged_stale_sig": forge(tiny_bundle_dir, base / "forged_stale_sig", None, **forged),
    }


@pytest.fixture
def serving_server(tmp_path: Path):
    """Factory: start a serving subprocess with extra env; every one started is stopped."""
    started: list[ServingProcess] = []

    def start(env: dict[str, str], wait_ready: bool = True) -> ServingProcess:
        proc = ServingProcess(env, tmp_path / f"server{len(started)}")
        started.append(proc)
        return proc.start(wait_ready)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def local_bundle_server(serving_bundles, tmp_path_factory) -> Iterator[ServingProcess]:
    """One server on the good bundle (via a symlink) for the API and bad-input tests."""
    work = tmp_path_factory.mktemp("api-server")
    link = work / "current"
    point_link(link, serving_bundles["good"])
    proc = ServingProcess(
        {"SERVING_BUNDLE_PATH": str(link), "SERVING_ADMIN_API_KEYS": "admin-key-1-0123456789ab,admin-key-2-0123456789ab",
         "SERVING_MAX_UPLOAD_BYTES": "2000000", "SERVING_MAX_BATCH": "4"},
        work,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


