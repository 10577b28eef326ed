"""The review queue page in Debian's Chromium (Playwright) against a real server and SeaweedFS.

A reviewer enters their key, opens a scored batch, reviews with the keyboard only (c confirm,
1..9 correct, j/k move) on a 1366x768 laptop screen; the decisions are read back from S3.
"""

from __future__ import annotations

import pytest

from contracts.reviews import read_decisions
from tests.e2e.test_serving_page import SCREENSHOT_DIR, browser  # noqa: F401 - the Chromium fixture
from tests.fixtures.data import unique_dataset_name
from tests.fixtures.screening import write_scored_batch
from tests.serving.support import ServingProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REVIEWER_KEY = "rev-key-e2e-0123456789abcdef"
LAPTOP = {"width": 1366, "height": 768}


@pytest.fixture
def review_page_server(local_stack, s3, tmp_path):
    from pipeline.storage import ensure_bucket

    dataset = unique_dataset_name("rp")
    ensure_bucket(s3, local_stack)
    images = write_scored_batch(s3, local_stack.s3_bucket, dataset, "slide-1", 2, 6)
    proc = ServingProcess({"DATASET": dataset, "SERVING_POLL_INTERVAL_S": "0",
                           "SERVING_REVIEWER_API_KEYS": f"alice:{REVIEWER_KEY}"}, tmp_path / "server")
    proc.start(wait_ready=False)
    try:
        yield proc, dataset, images
    finally:
        proc.stop()


def _states(page) -> list[str]:
    return page.locator("#queue li").evaluate_all("lis => lis.map(li => li.dataset.state)")


def test_keyboard_review_of_a_batch(review_page_server, browser, local_stack, s3):  # noqa: F811
    server, dataset, images = review_page_server
    ranked = sorted(images, key=lambda img: -img.probabilities["abnormal"])
    page = browser.new_page()
    page.set_viewport_size(LAPTOP)
    external = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith(
        (server.url, "data:", "blob:")) else None)

    page.goto(server.url + "/batches")
    page.wait_for_selector("#status.error")  # no key yet: it asks for one, shows no data
    assert "reviewer key" in page.inner_text("#status")
    page.fill("#key-input", REVIEWER_KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#batch-rows a")
    assert page.inner_text("#who") == "reviewing as alice"
    page.click("#batch-rows a")
    page.wait_for_function("document.querySelectorAll('#queue li').length === 6")

    texts = page.locator("#queue li strong").all_inner_texts()
    assert texts == [f"{i + 1}. {img.label}" for i, img in enumerate(ranked)]  # most suspicious first
    page.wait_for_function("document.getElementById('d-heat').naturalWidth > 0")
    box = page.locator("#detail").bounding_box()
    assert box["y"] + box["height"] <= LAPTOP["height"] and box["x"] + box["width"] <= LAPTOP["width"]
    assert "1 · abnormal" in page.inner_text("#actions") and page.inner_text("#refused-count") == "1"

    page.keyboard.press("c")  # confirm the first image; the page moves on to the second
    page.wait_for_function("document.querySelector('#queue li').dataset.state === 'confirmed'")
    assert page.locator("#queue li.current").get_attribute("data-index") == "1"
    page.keyboard.press("2")  # correct the second image to class 2 (normal)
    page.wait_for_function("document.querySelectorAll('#queue li')[1].dataset.state !== 'open'")
    expected_second = "confirmed" if ranked[1].label == "normal" else "corrected"
    assert _states(page)[:3] == ["confirmed", expected_second, "open"]
    page.keyboard.press("j")
    page.keyboard.press("k")
    assert page.locator("#queue li.current").get_attribute("data-index") == "2"

    stored = read_decisions(s3, local_stack.s3_bucket, dataset, "slide-1")
    assert [(d.image_key, d.reviewed_label, d.reviewer, d.model_version) for d in stored] == [
        (ranked[0].key, ranked[0].label, "alice", "2"), (ranked[1].key, "normal", "alice", "2")]

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "review-page.png"))
    page.reload()  # the key stays for this tab; decisions come back from S3; it opens on the first open image
    page.wait_for_function("document.querySelectorAll('#queue li').length === 6")
    assert _states(page)[:2] == ["confirmed", expected_second]
    assert page.locator("#queue li.current").get_attribute("data-index") == "2"
    assert "2 / 6 reviewed" in page.inner_text("#progress")
    assert external == [], external


def test_contribute_is_offered_to_reviewers_only_and_off_by_default(local_stack, s3, tiny_bundle_dir, browser,  # noqa: F811
                                                                     tmp_path):
    from scripts.screenshots import drop_file
    from tests.fixtures.data import make_image

    dataset = unique_dataset_name("cp")
    server = ServingProcess({"SERVING_BUNDLE_PATH": str(tiny_bundle_dir), "DATASET": dataset,
                             "SERVING_REVIEWER_API_KEYS": f"alice:{REVIEWER_KEY}"}, tmp_path / "server").start()
    try:
        image = tmp_path / "cell.png"
        make_image(3, (200, 80, 90), (48, 48)).save(image)
        page = browser.new_page()
        page.goto(server.url + "/")
        drop_file(page, "#dropzone", image, "image/png")
        page.wait_for_selector("#result:not([hidden])", timeout=20_000)
        assert page.locator("#contribute").is_hidden()  # not a reviewer in this tab: no offer

        page.evaluate(f"sessionStorage.setItem('hemaflow-reviewer-key', '{REVIEWER_KEY}')")
        drop_file(page, "#dropzone", image, "image/png")
        page.wait_for_selector("#contribute:not([hidden])", timeout=20_000)
        assert not page.is_checked("#contribute-opt-in") and page.is_disabled("#contribute-send")
        predicted = page.text_content("#pred-label")  # inner_text is CSS-capitalised
        assert page.input_value("#contribute-label") == predicted
        page.check("#contribute-opt-in")
        page.click("#contribute-send")
        page.wait_for_function("document.getElementById('contribute-status').textContent.startsWith('Contributed')")
        (batch,) = [o["Key"] for o in s3.list_objects_v2(Bucket=local_stack.s3_bucket,
                                                          Prefix=f"reviews/{dataset}/").get("Contents", [])]
        (decision,) = read_decisions(s3, local_stack.s3_bucket, dataset, batch.rsplit("/", 1)[1][:-len(".jsonl")])
        assert decision.reviewer == "alice" and decision.reviewed_label == predicted
    finally:
        server.stop()


def test_screenshots_of_a_scored_batch(review_page_server, browser, local_stack, s3, tmp_path):  # noqa: F811
    """scripts.screenshots: the newest *complete* scoring (numeric version order) is copied with its
    previews beside report.html; the report and review-page shots are PNGs within MAX_PNG_BYTES."""
    from PIL import Image

    from contracts.screening import PREDICTIONS_FILE, REPORT_FILE, results_prefix
    from scripts.screenshots import MAX_PNG_BYTES, fetch_batch_results, shoot_batch_report, shoot_review_page

    server, dataset, _ = review_page_server  # batch slide-1 scored by version 2
    newer = write_scored_batch(s3, local_stack.s3_bucket, dataset, "slide-1", 10, 3, seed=1)
    report_html = f"<h1>slide-1</h1><img src='thumbnails/{newer[0].sha256}.jpg'>".encode()
    s3.put_object(Bucket=local_stack.s3_bucket, Key=results_prefix(dataset, "slide-1", 10) + REPORT_FILE,
                  Body=report_html)
    shoot_review_page(browser, tmp_path, server.url, "slide-1", REVIEWER_KEY)

    s3.put_object(Bucket=local_stack.s3_bucket, Key=results_prefix(dataset, "slide-1", 11) + PREDICTIONS_FILE,
                  Body=b"key,sha256\n")  # still being scored: no summary.json yet
    report = fetch_batch_results(local_stack, dataset, "slide-1", tmp_path / "copy")
    assert report == tmp_path / "copy" / REPORT_FILE and report.read_bytes() == report_html
    assert {p.name for p in (tmp_path / "copy" / "thumbnails").iterdir()} == {f"{i.sha256}.jpg" for i in newer}
    shoot_batch_report(browser, tmp_path, report)
    for name in ("batch-report.png", "review-page.png"):
        shot = tmp_path / name
        assert 0 < shot.stat().st_size <= MAX_PNG_BYTES
        with Image.open(shot) as img:
            assert img.format == "PNG" and img.width >= 400
