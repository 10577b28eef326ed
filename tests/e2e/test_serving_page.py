"""The web page in a real browser: Debian's Chromium, driven by Playwright, against a real server.

Drops a real smear image (from ../shared/data/leukemia, else a generated one) on the page and
checks the probability bars, the Grad-CAM heatmap and its toggle, the clinical note and the
model version; keyboard access to the picker; a screenshot is saved to a git-ignored folder.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from scripts.screenshots import CHROMIUM, CHROMIUM_ARGS, drop_file
from tests.helpers import REPO_ROOT, SHARED_DATA
from tests.serving.support import ServingProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SCREENSHOT_DIR = Path(os.environ.get("HEMAFLOW_SCREENSHOT_DIR", REPO_ROOT / ".hemaflow" / "screenshots"))


def _real_or_generated_image(tmp_path: Path) -> tuple[Path, str]:
    folder = SHARED_DATA / "leukemia" / "Pro"
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if files:
        return files[0], "real"
    rng = np.random.default_rng(0)
    img = np.full((224, 224, 3), (232, 200, 210), np.uint8)
    yy, xx = np.mgrid[0:224, 0:224]
    for _ in range(4):
        cy, cx, r = rng.integers(40, 184, 2).tolist() + [int(rng.integers(15, 35))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (110, 60, 150)
    path = tmp_path / "generated-smear.jpg"
    Image.fromarray(img).save(path, "JPEG", quality=92)
    return path, "generated"


@pytest.fixture
def page_server(request, tmp_path):
    # HEMAFLOW_E2E_BUNDLE: run the page against another bundle (e.g. a leukemia model for the README shot).
    bundle = os.environ.get("HEMAFLOW_E2E_BUNDLE") or request.getfixturevalue("tiny_bundle_dir")
    proc = ServingProcess({"SERVING_BUNDLE_PATH": str(bundle)}, tmp_path / "server")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def browser(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def test_drop_an_image_and_see_bars_heatmap_and_version(page_server, browser, tmp_path):
    image_path, kind = _real_or_generated_image(tmp_path)
    model = httpx.get(f"{page_server.url}/v1/model").json()
    page = browser.new_page()
    external = []
    page.on("request", lambda req: external.append(req.url) if not req.url.startswith(
        (page_server.url, "data:", "blob:")) else None)
    page.goto(page_server.url + "/")
    page.wait_for_selector("#ready-dot.ready")
    assert model["model"]["version"] in page.inner_text("#model-text")

    drop_file(page, "#dropzone", image_path, "image/jpeg")
    page.wait_for_selector("#result:not([hidden])", timeout=20_000)

    bars = page.locator("#bars .bar-row")
    assert bars.count() == len(model["labels"])
    assert sorted(bars.evaluate_all("rows => rows.map(r => r.dataset.label)")) == sorted(model["labels"])
    values = [float(v) for v in page.locator("#bars [role=meter]").evaluate_all(
        "els => els.map(e => e.getAttribute('aria-valuenow'))")]
    assert sum(values) == pytest.approx(100.0, abs=0.5)
    widths = page.locator("#bars .bar-fill").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
    assert max(widths) > 0
    top = page.inner_text("#pred-label").strip().lower()
    assert top in model["labels"]
    assert page.locator(f'#bars .bar-row.top[data-label="{top}"]').count() == 1

    cam = page.locator("#cam-image")
    assert cam.get_attribute("data-mode") == "overlay"
    assert cam.get_attribute("src").startswith("data:image/png;base64,")
    assert cam.evaluate("img => img.complete && img.naturalWidth") == model["image_size"]
    overlay_src = cam.get_attribute("src")
    page.click("#cam-toggle")
    assert cam.get_attribute("data-mode") == "input" and cam.get_attribute("src") != overlay_src
    page.click("#cam-toggle")
    assert cam.get_attribute("src") == overlay_src

    assert page.inner_text("#meta-version") == model["model"]["version"]
    assert page.inner_text("#meta-dataset") == model["model"]["dataset_version"]
    assert page.inner_text("#meta-time").endswith("ms")
    assert "Screening aid, not a diagnosis" in page.inner_text("#clinical")
    assert page.locator("#preview").is_visible()
    assert external == [], external  # every asset is local

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "serving-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(io.BytesIO(shot.read_bytes())).size[0] == 1280
    print(f"screenshot ({kind} image): {shot}")


def test_keyboard_picker_and_bad_file_message(page_server, browser, tmp_path):
    page = browser.pages[0] if browser.pages else browser.new_page()
    page.goto(page_server.url + "/")
    page.bring_to_front()
    page.wait_for_selector("#ready-dot.ready")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "dropzone"
    # Enter on the focused drop zone opens the picker (it clicks the file input). The native
    # dialog is not awaited: headless Chromium does not always report it when run after other tests.
    page.evaluate("""() => { window.__pickerOpened = false;
        document.getElementById('file-input').addEventListener('click', e => {
            window.__pickerOpened = true; e.preventDefault(); }, { once: true }); }""")
    page.keyboard.press("Enter")
    assert page.evaluate("window.__pickerOpened") is True
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not really a png" * 10)
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#error:not([hidden])", timeout=20_000)
    assert "not a recognised image" in page.inner_text("#error")
    assert page.locator("#result").is_hidden()

    # Small screens: the layout stacks into one column.
    page.set_viewport_size({"width": 390, "height": 800})
    boxes = [page.locator(s).bounding_box() for s in (".upload-card", "#dropzone")]
    assert all(b and b["width"] <= 390 for b in boxes)


def test_an_out_of_scope_image_shows_the_refusal_instead_of_a_class(tiny_ood_bundle_dir, browser, tmp_path):
    proc = ServingProcess({"SERVING_BUNDLE_PATH": str(tiny_ood_bundle_dir)}, tmp_path / "ood-server").start()
    try:
        flat = tmp_path / "grey.jpg"
        Image.new("RGB", (640, 480), (128, 128, 128)).save(flat, "JPEG", quality=90)
        page = browser.pages[0] if browser.pages else browser.new_page()
        page.goto(proc.url + "/")
        page.wait_for_selector("#ready-dot.ready")
        drop_file(page, "#dropzone", flat, "image/jpeg")
        page.wait_for_selector("#out-of-scope:not([hidden])", timeout=20_000)
        assert "This image does not look like what the model was trained on" in page.inner_text("#out-of-scope")
        assert not page.locator("#answer").is_visible() and not page.locator("#pred-label").is_visible()
        assert page.inner_text("#meta-version")  # which model refused it is still shown
    finally:
        proc.stop()
