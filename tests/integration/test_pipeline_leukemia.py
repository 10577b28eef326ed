"""The whole pipeline on a subset of the real leukemia images (skipped when ../shared/data is absent)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import shared_dataset
from tests.fixtures.data import TINY_SETTINGS, unique_dataset_name, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PER_CLASS = 20
PRO_RANGE = range(1, 41)  # Pro 001-040 holds several byte-identical pairs (e.g. 011/012, 021/022)
# ... and near-copies (the same field, other bytes) that the content hash alone splits apart
# (004/005 train/val, 007/008 test/val with the default salt): one split each now.
NEAR_COPIES = [("WBC-Malignant-Pro-004.jpg", "WBC-Malignant-Pro-005.jpg"),
               ("WBC-Malignant-Pro-007.jpg", "WBC-Malignant-Pro-008.jpg")]


def test_real_leukemia_subset_end_to_end(local_stack, s3, tmp_path):
    from contracts.dataset_spec import load_spec
    from contracts.processed import read_local_manifest
    from pipeline.storage import fetch_processed
    from pipeline.run import run_pipeline
    from contracts.settings import get_settings
    from pipeline.upload import upload_tree

    source = shared_dataset("leukemia")
    real = load_spec("leukemia")
    name = unique_dataset_name("leuk")
    write_spec(tmp_path / "specs", name, real.classes, real.positive_label)
    tree = tmp_path / "tree"
    for folder in real.class_folders:
        (tree / folder).mkdir(parents=True)
        files = sorted((source / folder).iterdir())
        chosen = files[:PER_CLASS] if folder != "Pro" else [f for f in files if any(
            f.name.endswith(f"-{i:03d}.jpg") for i in PRO_RANGE)]
        for f in chosen:
            (tree / folder / f.name).symlink_to(f)  # read in place: the real images are never copied
    settings = get_settings(**{**TINY_SETTINGS, "image_size": 64, "dataset_specs_dir": tmp_path / "specs"})
    uploaded = upload_tree(tree, name, settings)
    total = uploaded["uploaded"]
    assert total >= 3 * PER_CLASS + 30

    result = run_pipeline(name, settings)
    assert result["ingest"]["total"] == total and result["ingest"]["errors"] == 0
    summary = json.loads(s3.get_object(Bucket=settings.s3_bucket, Key=result["validate"]["summary_key"])
                         ["Body"].read())
    # The published set contains byte-identical duplicates: validation finds and reports them.
    groups = summary["duplicate_groups"]
    names = [[k.rsplit("/", 1)[1] for k in g] for g in groups]
    assert ["WBC-Malignant-Pro-011.jpg", "WBC-Malignant-Pro-012.jpg"] in names
    assert len(groups) >= 2 and summary["duplicates_dropped"] == len(groups)
    assert summary["quarantined"] == 0 and summary["status"] == "passed"
    kept = summary["kept"]
    assert kept == total - len(groups)

    version = result["preprocess"]["dataset_version"]
    folder = fetch_processed(name, version, settings)
    rows = read_local_manifest(folder)
    assert len(rows) == kept and {r["format"] for r in rows} == {"JPEG"}
    by_split = {sp: {r["label"] for r in rows if r["split"] == sp} for sp in ("train", "val", "test")}
    assert all(labels == {"normal", "abnormal"} for labels in by_split.values()), by_split
    assert summary["near_duplicate_groups"] >= len(NEAR_COPIES) and not summary["near_duplicates_across_labels"]
    split_of = {r["key"].rsplit("/", 1)[1]: r["split"] for r in rows}
    for a, b in NEAR_COPIES:
        assert split_of[a] == split_of[b], (a, b, split_of[a], split_of[b])
    again = run_pipeline(name, settings)
    assert again["preprocess"]["created"] is False and again["preprocess"]["dataset_version"] == version
