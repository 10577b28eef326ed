"""Bad input and faults against the real SeaweedFS: quarantine with reasons, duplicates, kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.fixtures.data import bad_images, make_image_tree, unusual_images

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _get_json(s3, bucket, key):
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_bad_files_in_the_bucket_are_quarantined_with_reasons(tiny_dataset_factory, s3):
    from pipeline.ingest import ingest
    from pipeline.preprocess import preprocess
    from pipeline.upload import upload_tree
    from pipeline.validate import ValidationFailed, validate

    settings, dataset, root = tiny_dataset_factory({"neg": 20, "pos": 20}, max_bad_fraction=0.3)
    expected = {}
    for name, (data, reason) in bad_images().items():
        (root / "neg" / name).write_bytes(data)
        expected[f"raw/{dataset}/neg/{name}"] = reason
    for name, data in unusual_images().items():
        (root / "pos" / name).write_bytes(data)
    # A same-label duplicate (kept once) and a cross-label duplicate (both quarantined).
    (root / "neg" / "copy_of_neg_0001.png").write_bytes((root / "neg" / "neg_0001.png").read_bytes())
    (root / "pos" / "also_neg_0002.png").write_bytes((root / "neg" / "neg_0002.png").read_bytes())
    expected[f"raw/{dataset}/neg/neg_0002.png"] = "conflicting_labels"
    expected[f"raw/{dataset}/pos/also_neg_0002.png"] = "conflicting_labels"
    upload_tree(root, dataset, settings)

    ingested = ingest(dataset, settings)  # nothing crashes; unreadable files are recorded
    assert ingested.total == 40 + len(bad_images()) + len(unusual_images()) + 2
    assert ingested.errors >= 4  # empty, not-an-image, two bombs (header-level)
    result = validate(ingested.manifest_key, dataset, settings)
    bucket = settings.s3_bucket
    summary = _get_json(s3, bucket, result.summary_key)
    got = {item["key"]: item["reason"] for item in summary["quarantined_items"]}
    assert got == expected
    assert result.quarantined == len(expected)
    for key, reason in expected.items():
        rel = key.split(f"raw/{dataset}/", 1)[1]
        qkey = f"quarantine/{dataset}/{result.run_id}/{rel}"
        record = _get_json(s3, bucket, qkey + ".reason.json")
        assert record["reason"] == reason and record["detail"] and record["key"] == key
        assert s3.head_object(Bucket=bucket, Key=qkey)["ContentLength"] == s3.head_object(
            Bucket=bucket, Key=key)["ContentLength"]
    assert summary["duplicate_groups"] == [sorted([f"raw/{dataset}/neg/copy_of_neg_0001.png",
                                                   f"raw/{dataset}/neg/neg_0001.png"]),
                                           sorted([f"raw/{dataset}/neg/neg_0002.png",
                                                   f"raw/{dataset}/pos/also_neg_0002.png"])]
    assert summary["duplicates_dropped"] == 1
    assert any("expect_column_values_to_be_unique" in w for w in summary["warnings"])
    md = s3.get_object(Bucket=bucket, Key=result.summary_key.replace("summary.json", "summary.md"))["Body"]
    assert "decompression_bomb" in md.read().decode()
    gx = _get_json(s3, bucket, result.gx_result_key)
    assert len(gx["results"]) >= 10

    validated = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=result.validated_key)["Body"]
                 .read().splitlines()]
    keys = {r["key"] for r in validated}
    assert not keys & set(expected)
    assert {f"raw/{dataset}/pos/{n}" for n in unusual_images()} <= keys  # accepted and converted
    assert len(validated) == 40 - 1 + len(unusual_images())  # neg_0002 quarantined, one duplicate dropped
    processed = preprocess(result.validated_key, dataset, settings)
    assert sum(processed.per_split.values()) == len(validated)

    # The same bad data with the default 5% threshold fails, clearly, and says where to look.
    strict = settings.model_copy(update={"max_bad_fraction": 0.05})
    with pytest.raises(ValidationFailed, match=r"MAX_BAD_FRACTION=5\.0%.*quarantine/"):
        validate(ingested.manifest_key, dataset, strict)
    with pytest.raises(ValidationFailed):  # the saved verdict is reused, and still fails
        validate(ingested.manifest_key, dataset, strict)


def test_killed_ingest_leaves_no_partial_file_and_rerun_completes(tiny_dataset_factory, tmp_path):
    from pipeline.cache import cache_root
    from pipeline.ingest import ingest
    from pipeline.upload import upload_tree

    settings, dataset, _ = tiny_dataset_factory({"neg": 1, "pos": 1})
    root = make_image_tree(tmp_path / "big", {"neg": 60, "pos": 60}, size=(320, 320), seed=3)
    upload_tree(root, dataset, settings)
    home = tmp_path / "worker-home"
    env = {**os.environ, "HEMAFLOW_HOME": str(home), "DATASET_SPECS_DIR": str(settings.dataset_specs_dir),
           "TRANSFER_WORKERS": "1", "HEMAFLOW_ENV_FILE": ""}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", "--dataset", dataset], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = settings.model_copy(update={"hemaflow_home": home})
    objects = cache_root(worker)

    def cached() -> list:
        return [p for p in objects.glob("??/*") if p.is_file()] if objects.is_dir() else []

    deadline = time.monotonic() + 60
    while len(cached()) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_at = len(cached())
    assert 10 <= killed_at < 120, f"the ingest was not interrupted midway ({killed_at} of 120 cached)"
    for path in cached():  # every file under a content name is complete
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name

    result = ingest(dataset, worker)
    assert result.total == 120 and result.new == 120 and result.errors == 0
    files = cached()
    assert len(files) == 120
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    assert list((objects / ".tmp").glob("*")) == []  # the killed process's temporaries are gone
