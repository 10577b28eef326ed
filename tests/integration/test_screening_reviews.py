"""Review decisions on a real SeaweedFS: append-only, compare-and-set, nothing lost under concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from contracts.screening import review_key
from contracts.reviews import append_decisions, latest_by_image, new_decision, read_decisions
from tests.fixtures.data import unique_dataset_name

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _decision(dataset: str, batch: str, n: int, label: str = "abnormal", reviewer: str = "alice"):
    return new_decision(dataset=dataset, batch_id=batch, image_key=f"inbox/{dataset}/{batch}/img{n}.png",
                        sha256=f"{n:064x}", model_version=3, predicted_label="normal", reviewed_label=label,
                        reviewer=reviewer)


def test_seaweedfs_refuses_a_stale_if_match(s3, local_stack):
    """The compare-and-set the review file relies on: a write with an outdated ETag is refused."""
    bucket, key = local_stack.s3_bucket, f"reviews/{unique_dataset_name()}/cas.jsonl"
    first = s3.put_object(Bucket=bucket, Key=key, Body=b"1\n", IfNoneMatch="*")["ETag"]
    s3.put_object(Bucket=bucket, Key=key, Body=b"1\n2\n", IfMatch=first)
    with pytest.raises(Exception, match="PreconditionFailed"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"1\n3\n", IfMatch=first)
    with pytest.raises(Exception, match="PreconditionFailed"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x\n", IfNoneMatch="*")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"1\n2\n"


def test_append_keeps_order_and_is_idempotent_by_review_id(s3, local_stack):
    dataset, bucket = unique_dataset_name(), local_stack.s3_bucket
    first, second = _decision(dataset, "b1", 1), _decision(dataset, "b1", 2, label="normal")
    assert append_decisions(s3, bucket, [first]) == 1
    assert append_decisions(s3, bucket, [first, second]) == 1  # a retried request adds nothing twice
    assert read_decisions(s3, bucket, dataset, "b1") == [first, second]
    changed = _decision(dataset, "b1", 1, label="normal", reviewer="bob")
    append_decisions(s3, bucket, [changed])
    latest = latest_by_image(read_decisions(s3, bucket, dataset, "b1"))
    assert latest[first.image_key] == changed and latest[second.image_key] == second
    raw = s3.get_object(Bucket=bucket, Key=review_key(dataset, "b1"))["Body"].read().decode()
    assert raw.count("\n") == 3 and raw.endswith("\n")
    assert read_decisions(s3, bucket, dataset, "never-reviewed") == []


def _client(kind: str, settings):
    """boto3 (the pipeline, feedback) or serving's standard-library client: reviews work on both."""
    from pipeline.storage import s3_client
    from serving.s3 import S3Lite

    return s3_client(settings) if kind == "boto3" else S3Lite(settings)


@pytest.mark.parametrize("kind", ["boto3", "serving"])
def test_concurrent_reviewers_lose_nothing(local_stack, kind):
    """8 writers x 6 decisions on one file, each writer with its own client: all 48 lines arrive."""
    from pipeline.storage import s3_client

    dataset, bucket = unique_dataset_name(), local_stack.s3_bucket
    batches = [[_decision(dataset, "busy", w * 100 + i, reviewer=f"r{w}") for i in range(6)] for w in range(8)]

    def reviewer(decisions):
        client = _client(kind, local_stack)
        return sum(append_decisions(client, bucket, [d]) for d in decisions)

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(reviewer, batches)) == 48
    stored = read_decisions(s3_client(local_stack), bucket, dataset, "busy")
    assert sorted(d.review_id for d in stored) == sorted(d.review_id for b in batches for d in b)
    for w, decisions in enumerate(batches):  # each reviewer's own decisions keep their order
        assert [d for d in stored if d.reviewer == f"r{w}"] == decisions


def test_one_batch_per_call(s3, local_stack):
    dataset = unique_dataset_name()
    with pytest.raises(ValueError, match="one batch"):
        append_decisions(s3, local_stack.s3_bucket, [_decision(dataset, "a", 1), _decision(dataset, "b", 2)])


def test_serving_s3_client_matches_boto3(s3, local_stack):
    """serving.s3 (no boto3 in the serving image) against the same SeaweedFS: reads, conditional
    writes, metadata, paginated listings with folders, and errors in boto3's shape."""
    from serving.s3 import S3Error, S3Lite

    # serving writes under reviews/ only (its identity: test_serving_identity_is_scoped_to_the_review_queue)
    dataset = unique_dataset_name()
    lite, bucket, base, written = S3Lite(local_stack), local_stack.s3_bucket, f"results/{dataset}/", f"reviews/{dataset}/"
    etag = lite.put_object(Bucket=bucket, Key=written + "a b+é.csv", Body=b"x,y\n", IfNoneMatch="*")["ETag"]
    got = s3.get_object(Bucket=bucket, Key=written + "a b+é.csv")
    assert got["Body"].read() == b"x,y\n" and got["ETag"] == etag
    with pytest.raises(S3Error) as refused:
        lite.put_object(Bucket=bucket, Key=written + "a b+é.csv", Body=b"z", IfMatch='"0123"')
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    with pytest.raises(S3Error) as missing:
        lite.get_object(Bucket=bucket, Key=base + "nothing")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    s3.put_object(Bucket=bucket, Key=base + "m.png", Body=b"p", Metadata={"hemaflow-review-id": "r1"})
    assert lite.head_object(Bucket=bucket, Key=base + "m.png")["Metadata"] == {"hemaflow-review-id": "r1"}
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"{base}b{i}/1/predictions.csv", Body=b"k")
    folders, token = [], None
    while True:
        page = lite.list_objects_v2(Bucket=bucket, Prefix=base, Delimiter="/", MaxKeys=2,
                                    **({"ContinuationToken": token} if token else {}))
        folders += [p["Prefix"] for p in page["CommonPrefixes"]]
        token = page.get("NextContinuationToken")
        if not token:
            break
    assert folders == [f"{base}b{i}/" for i in range(5)]
    keys = [c["Key"] for c in lite.list_objects_v2(Bucket=bucket, Prefix=base)["Contents"]]
    assert keys == sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=base)["Contents"])


def test_serving_identity_is_scoped_to_the_review_queue(s3, local_stack):
    """Serving's own SeaweedFS identity (SERVING_S3_*; contracts.screening.serving_s3_actions), checked
    by the real SeaweedFS: it reads scorings and inbox images and writes review files, and is refused
    everywhere else (the pipeline's data and MLflow's artifacts)."""
    from serving.s3 import S3Error, S3Lite

    s, dataset = local_stack, unique_dataset_name()
    lite, bucket = S3Lite(s), s.s3_bucket
    assert lite.access_key == s.serving_s3_access_key_id != s.aws_access_key_id
    for key in (f"results/{dataset}/b/1/summary.json", f"inbox/{dataset}/b/x.png", f"raw/{dataset}/c/x.png",
                f"processed/{dataset}/v1/dataset.json", f"{s.mlflow_artifacts_prefix}/{dataset}/model.tflite"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"pipeline data")
    assert lite.get_object(Bucket=bucket, Key=f"results/{dataset}/b/1/summary.json")["Body"].read() == b"pipeline data"
    assert lite.get_object(Bucket=bucket, Key=f"inbox/{dataset}/b/x.png")["Body"].read() == b"pipeline data"
    listed = lite.list_objects_v2(Bucket=bucket, Prefix=f"results/{dataset}/", Delimiter="/")["CommonPrefixes"]
    assert listed == [{"Prefix": f"results/{dataset}/b/"}]
    lite.put_object(Bucket=bucket, Key=f"reviews/{dataset}/b.jsonl", Body=b"{}\n")
    lite.put_object(Bucket=bucket, Key=f"inbox/{dataset}/contributed-2026-12-02/y.png", Body=b"img")

    def refused(call, **kw) -> str:
        with pytest.raises(S3Error) as denied:
            call(Bucket=bucket, **kw)
        return denied.value.response["Error"]["Code"]

    for key in (f"results/{dataset}/b/1/summary.json", f"raw/{dataset}/c/x.png", f"processed/{dataset}/v1/x",
                f"{s.mlflow_artifacts_prefix}/{dataset}/model.tflite", f"{dataset}-outside.txt"):
        assert refused(lite.put_object, Key=key, Body=b"overwritten") == "AccessDenied", key
    for key in (f"raw/{dataset}/c/x.png", f"processed/{dataset}/v1/dataset.json",
                f"{s.mlflow_artifacts_prefix}/{dataset}/model.tflite"):
        assert refused(lite.get_object, Key=key) == "AccessDenied", key
    assert refused(lite.list_objects_v2, Prefix=f"raw/{dataset}/") == "AccessDenied"
    assert refused(lite.list_objects_v2, Prefix="") == "AccessDenied"
    # nothing it was refused reached the bucket
    assert s3.get_object(Bucket=bucket, Key=f"results/{dataset}/b/1/summary.json")["Body"].read() == b"pipeline data"
    assert s3.get_object(Bucket=bucket, Key=f"raw/{dataset}/c/x.png")["Body"].read() == b"pipeline data"
