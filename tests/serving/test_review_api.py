"""The review queue's API on a real serving process and a real SeaweedFS.

Batches are written in the contract's format by tests/fixtures/screening.py; decisions land in
`reviews/<dataset>/<batch_id>.jsonl` and are read back from S3, not from the API.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from contracts.reviews import read_decisions
from tests.fixtures.data import unique_dataset_name
from tests.fixtures.screening import write_scored_batch
from tests.serving.support import ServingProcess

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ALICE = "rev-key-alice-0123456789abcdef"
BARE = "rev-key-bare-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
PREDICT = "predict-key-0123456789abcdef"


@pytest.fixture(scope="module")
def review_server(local_stack, tmp_path_factory):
    """A server of a fresh dataset with one scored batch `b1` (12 images + 1 refused) by model version 2."""
    from pipeline.storage import ensure_bucket, s3_client

    dataset = unique_dataset_name("rq")
    client = s3_client(local_stack)
    ensure_bucket(client, local_stack)
    images = write_scored_batch(client, local_stack.s3_bucket, dataset, "b1", 2, 12)
    write_scored_batch(client, local_stack.s3_bucket, dataset, "b1", 1, 3, pictures=False)  # an older scoring
    proc = ServingProcess({"DATASET": dataset, "SERVING_POLL_INTERVAL_S": "0",
                           "SERVING_REVIEWER_API_KEYS": f"alice:{ALICE},{BARE}",
                           "SERVING_ADMIN_API_KEYS": ADMIN, "SERVING_API_KEYS": PREDICT},
                          tmp_path_factory.mktemp("review-server"))
    proc.start(wait_ready=False)  # the review queue needs no model
    try:
        yield proc, dataset, images, client
    finally:
        proc.stop()


def _get(server, path, key=ALICE, **kw):
    return httpx.get(server.url + path, headers={"X-API-Key": key} if key else {}, timeout=30, **kw)


def _post(server, path, body, key=ALICE):
    return httpx.post(server.url + path, json=body, headers={"X-API-Key": key}, timeout=30)


def test_batches_list_and_ranked_batch(review_server, local_stack):
    server, dataset, images, client = review_server
    from contracts.screening import results_prefix

    # Version 3 is still being scored (a chunk file, no summary.json): the finished version 2 stays shown.
    client.put_object(Bucket=local_stack.s3_bucket, Key=results_prefix(dataset, "b1", "3") + "_chunks/0000000.jsonl",
                      Body=b"{}\n")
    listing = _get(server, "/v1/batches").json()
    assert listing["dataset"] == dataset and listing["reviewer"] == "alice"
    (batch,) = listing["batches"]
    assert batch["batch_id"] == "b1" and batch["versions"] == ["2", "1"] and batch["model_version"] == "2"
    body = _get(server, "/v1/batches/b1").json()
    p_pos = [item["probabilities"]["abnormal"] for item in body["items"]]
    assert p_pos == sorted((img.probabilities["abnormal"] for img in images), reverse=True)
    assert body["labels"] == ["abnormal", "normal"] and len(body["items"]) == 12
    assert [r["error"] for r in body["refused"]] == ["not_an_image"]
    assert len(_get(server, "/v1/batches/b1", params={"version": "1"}).json()["items"]) == 3


def test_heatmaps_and_thumbnails(review_server):
    server, _, images, _ = review_server
    sha = images[0].sha256
    heat = _get(server, f"/v1/batches/b1/images/{sha}/heatmap", params={"version": "2"})
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png" and heat.content[:4] == b"\x89PNG"
    assert _get(server, f"/v1/batches/b1/images/{sha}/thumbnail").content == images[0].data
    # version 1 has no pictures: the thumbnail is made from the inbox image, the heatmap is missing
    made = _get(server, f"/v1/batches/b1/images/{sha}/thumbnail", params={"version": "1"})
    assert made.status_code == 200 and made.content[:4] == b"\x89PNG"
    assert _get(server, f"/v1/batches/b1/images/{sha}/heatmap", params={"version": "1"}).status_code == 404
    assert _get(server, f"/v1/batches/b1/images/{'0' * 64}/heatmap").status_code == 404


def test_confirm_and_correct_are_appended_with_reviewer_and_version(review_server, local_stack):
    server, dataset, images, client = review_server
    first, second = images[1], images[2]
    confirm = _post(server, "/v1/batches/b1/reviews", {"sha256": first.sha256, "reviewed_label": first.label})
    other = next(lab for lab in ("abnormal", "normal") if lab != second.label)
    correct = _post(server, "/v1/batches/b1/reviews", {"sha256": second.sha256, "reviewed_label": other}, key=BARE)
    assert confirm.status_code == 201 and correct.status_code == 201, (confirm.text, correct.text)
    stored = {d.review_id: d for d in read_decisions(client, local_stack.s3_bucket, dataset, "b1")}
    c, k = stored[confirm.json()["review_id"]], stored[correct.json()["review_id"]]
    assert c.confirmed and c.reviewer == "alice" and c.model_version == "2" and c.image_key == first.key
    assert not k.confirmed and k.reviewed_label == other and k.predicted_label == second.label
    assert k.reviewer == "key-" + hashlib.sha256(BARE.encode()).hexdigest()[:8]  # never the key itself
    items = {i["sha256"]: i for i in _get(server, "/v1/batches/b1").json()["items"]}
    assert items[second.sha256]["review"]["reviewed_label"] == other
    assert {d["review_id"] for d in _get(server, "/v1/batches/b1/reviews").json()["decisions"]} >= set(stored)


def test_concurrent_reviews_through_the_api_lose_nothing(review_server, local_stack):
    server, dataset, images, client = review_server
    before = len(read_decisions(client, local_stack.s3_bucket, dataset, "b1"))
    bodies = [{"sha256": images[i % 12].sha256, "reviewed_label": ("abnormal", "normal")[i % 2]} for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: _post(server, "/v1/batches/b1/reviews", b), bodies))
    assert [a.status_code for a in answers] == [201] * 16
    stored = read_decisions(client, local_stack.s3_bucket, dataset, "b1")
    assert len(stored) == before + 16
    assert {a.json()["review_id"] for a in answers} <= {d.review_id for d in stored}


def test_roles_and_bad_requests(review_server):
    server, _, images, _ = review_server
    body = {"sha256": images[0].sha256, "reviewed_label": "normal"}
    assert _get(server, "/v1/batches", key=None).status_code == 401
    for wrong in (ADMIN, PREDICT, "rev-key-unknown-0123456789"):
        assert _get(server, "/v1/batches", key=wrong).status_code == 403
        answer = _post(server, "/v1/batches/b1/reviews", body, key=wrong)
        assert answer.status_code == 403 and answer.json()["error"] == "api_key_invalid"
    for bad in (".hidden", "a%20b", "x" * 65):
        answer = _get(server, f"/v1/batches/{bad}")
        assert answer.status_code == 400 and answer.json()["error"] == "bad_batch_id", bad
        assert _post(server, f"/v1/batches/{bad}/reviews", body).status_code == 400
    assert _get(server, "/v1/batches/never-scored").status_code == 404
    assert _get(server, "/v1/batches/b1", params={"version": "9"}).status_code == 404
    assert _post(server, "/v1/batches/b1/reviews", body | {"reviewed_label": "blast"}).status_code == 422
    assert _post(server, "/v1/batches/b1/reviews", body | {"sha256": "f" * 64}).status_code == 404
    assert _post(server, "/v1/batches/b1/reviews", {"sha256": "nothex"}).status_code == 422
    page = httpx.get(server.url + "/batches/b1", timeout=10)  # the page itself holds no data
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_contribution_is_explicit_reviewer_only_and_stored_with_a_decision(local_stack, tiny_bundle_dir, tmp_path):
    from pipeline.storage import iter_objects, s3_client
    from tests.fixtures.data import make_image
    from tests.fixtures.screening import png_bytes

    dataset = unique_dataset_name("ct")
    proc = ServingProcess({"SERVING_BUNDLE_PATH": str(tiny_bundle_dir), "DATASET": dataset,
                           "SERVING_REVIEWER_API_KEYS": f"alice:{ALICE}", "SERVING_API_KEYS": PREDICT},
                          tmp_path / "server").start()
    try:
        client = s3_client(local_stack)
        image = png_bytes(make_image(5, (200, 80, 90), (48, 48)))
        labels = httpx.get(proc.url + "/v1/model", timeout=10).json()["labels"]

        def send(key, label=labels[0], data=image):
            return httpx.post(proc.url + "/v1/contributions", params={"label": label, "predicted_label": labels[1]},
                              files={"file": ("x.png", data, "image/png")}, headers={"X-API-Key": key} if key else {},
                              timeout=30)

        assert httpx.post(proc.url + "/v1/predict", files={"file": ("x.png", image, "image/png")},
                          timeout=30).status_code == 200
        assert list(iter_objects(client, local_stack.s3_bucket, f"inbox/{dataset}/")) == []  # predict stores nothing
        assert send(None).status_code == 401 and send(PREDICT).status_code == 403
        assert send(ALICE, label="blast").status_code == 422
        assert send(ALICE, data=b"not an image at all" * 10).status_code in (415, 422)
        assert list(iter_objects(client, local_stack.s3_bucket, f"inbox/{dataset}/")) == []  # refusals store nothing
        answer = send(ALICE)
        assert answer.status_code == 201, answer.text
        decision = answer.json()
        assert decision["reviewer"] == "alice" and decision["reviewed_label"] == labels[0]
        assert decision["batch_id"].startswith("contributed-") and decision["extra"] == {"source": "contribution"}
        stored = client.get_object(Bucket=local_stack.s3_bucket, Key=decision["image_key"])["Body"].read()
        assert stored == image and decision["sha256"] == hashlib.sha256(image).hexdigest()
        (saved,) = read_decisions(client, local_stack.s3_bucket, dataset, decision["batch_id"])
        assert saved.review_id == decision["review_id"] and saved.model_version == decision["model_version"]
    finally:
        proc.stop()


def test_without_its_own_s3_identity_the_queue_answers_503_and_never_borrows_the_pipelines(local_stack, tmp_path):
    """The pipeline's S3 secret is in this process's environment; serving must not fall back to it."""
    assert local_stack.aws_secret_access_key.get_secret_value()
    proc = ServingProcess({"DATASET": unique_dataset_name("no"), "SERVING_POLL_INTERVAL_S": "0",
                           "SERVING_REVIEWER_API_KEYS": f"alice:{ALICE}", "SERVING_S3_SECRET_ACCESS_KEY": ""},
                          tmp_path / "server")
    proc.start(wait_ready=False)
    try:
        answer = _get(proc, "/v1/batches")
        assert answer.status_code == 503 and answer.json()["error"] == "screening_unavailable"
        assert "SERVING_S3_SECRET_ACCESS_KEY" in answer.text
    finally:
        proc.stop()
