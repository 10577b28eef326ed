"""Screenshots of the running demo for the README (`make demo` first):

    .venv/bin/python -m scripts.screenshots [--out scripts/screenshots] [--image PATH]

airflow-dag.png      the Airflow UI grid + task instances of the latest hemaflow_retrain_<dataset> run
                     (logged in through the UI's login form with the demo's generated admin password)
airflow-graph.png    the same run in the graph view (task states, the gate's branch)
mlflow-registry.png  the MLflow registry page of the model, with the @champion alias
mlflow-run.png       the champion's MLflow run page (test metrics)
serving-page.png     the serving page after dropping a real image (bars + Grad-CAM overlay)
batch-report.png     the report.html of a scored batch (newest scoring of --batch, default the demo's
                     held-back batch), opened from a local copy of its results folder
review-page.png      that batch on the serving instance's review page (/batches/<id>), entered with a
                     reviewer key (--reviewer-key, else the first of SERVING_REVIEWER_API_KEYS); the
                     script only looks: it records no decision

Drives Debian's Chromium through Playwright with a fresh profile. Each PNG is palette-quantised
(and downscaled if still needed) to stay under MAX_PNG_BYTES so the README stays light.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

from contracts.settings import PROJECT_ROOT, get_settings
from scripts.demo_airflow import airflow_site
from scripts.demo import DEMO_BATCH_ID
from scripts.demo_data import SHARED_DEMO_DATA

CHROMIUM = os.environ.get("HEMAFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MAX_PNG_BYTES = 300_000
VIEWPORT = {"width": 1440, "height": 900}
TIMEOUT_MS = 60_000


def shrink_png(raw: bytes, max_bytes: int = MAX_PNG_BYTES) -> bytes:
    """Lossless PNG if small enough, else a 256-colour palette PNG (UI screenshots survive it),
    downscaled by 15 % steps until it fits."""
    from PIL import Image

    if len(raw) <= max_bytes:
        return raw
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    while True:
        buf = io.BytesIO()
        img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, "PNG", optimize=True)
        if buf.tell() <= max_bytes or img.width < 400:
            return buf.getvalue()
        img = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.LANCZOS)


def save_shot(page, path: Path, full_page: bool = False, clip: dict | None = None) -> None:
    data = shrink_png(page.screenshot(full_page=full_page, clip=clip))
    path.write_bytes(data)
    print(f"{path}  ({len(data) // 1024} KB)")


def demo_image(dataset: str) -> Path:
    """A real image of the demo data: the first malignant (Pro) smear of the leukemia set."""
    for folder in ("Pro", "Pre", "Early", "Benign"):
        files = sorted((SHARED_DEMO_DATA / dataset / folder).glob("*.jpg"))
        if files:
            return files[0]
    raise SystemExit(f"no image under {SHARED_DEMO_DATA / dataset}: pass --image PATH")


def drop_file(page, selector: str, path: Path, mime: str = "image/jpeg") -> None:
    """A real drag-and-drop of `path` onto `selector` (dragenter, dragover, drop)."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            return dt;
        }""",
        [data, path.name, mime],
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, event, {"dataTransfer": transfer})


def _get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:  # noqa: S310
        return json.loads(resp.read())


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def airflow_login(page, base: str, password: str) -> None:
    """Log in through the UI's own form, as a user does with the credentials `make demo` prints.
    The UI redirects to its login page from JavaScript, after the first load: wait for the form
    or the logged-in navigation, whichever comes."""
    password_box = page.locator("input[type=password]")
    logged_in = page.get_by_role("button", name="User")
    page.goto(base + "/", wait_until="load", timeout=TIMEOUT_MS)
    password_box.or_(logged_in).first.wait_for(timeout=TIMEOUT_MS)
    if password_box.is_visible():
        page.locator("input[name=username]").fill("admin")
        password_box.fill(password)
        page.get_by_role("button", name="Sign in").click()
        try:
            logged_in.wait_for(timeout=TIMEOUT_MS)
        except Exception as exc:  # noqa: BLE001 - say what failed, not a locator timeout
            raise SystemExit("Airflow login failed with the demo's admin password") from exc


def latest_run_id(base: str, password: str, dag_id: str) -> str:
    """The newest run of `dag_id`, from the REST API (a JWT from /auth/token, like any API client)."""
    token = _post_json(f"{base}/auth/token", {"username": "admin", "password": password})["access_token"]
    runs = _get_json(f"{base}/api/v2/dags/{dag_id}/dagRuns?limit=1&order_by=-run_after",
                     {"Authorization": f"Bearer {token}"})["dag_runs"]
    if not runs:
        raise SystemExit(f"{dag_id} has no run: run `make demo` first")
    return runs[0]["dag_run_id"]


def shoot_airflow(context, out: Path, base: str, password: str, dag_id: str) -> None:
    from urllib.parse import quote

    page = context.new_page()
    airflow_login(page, base, password)
    run_id = latest_run_id(base, password, dag_id)
    page.goto(f"{base}/dags/{dag_id}/runs/{quote(run_id, safe='')}", wait_until="networkidle",
              timeout=TIMEOUT_MS)
    page.get_by_text(re.compile(r"^\d+ Task Instances$")).first.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(2500)
    save_shot(page, out / "airflow-dag.png")
    page.get_by_role("button", name="Show Graph (Press g)").click()
    page.locator(".react-flow__node").first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Collapse Details Panel").click()  # the whole width for the graph
    page.set_viewport_size({"width": 1440, "height": 560})  # the graph is one wide row: no empty band
    page.wait_for_timeout(1000)
    page.locator(".react-flow__controls-fitview").click()
    page.wait_for_timeout(2500)
    save_shot(page, out / "airflow-graph.png")
    page.close()


def close_mlflow_assistant(page) -> None:
    """MLflow 3 opens its (LLM) assistant panel on first load; it would hide half the page."""
    close = page.get_by_role("button", name="Close")
    if close.count() and close.first.is_visible():
        close.first.click()
        page.wait_for_timeout(500)


def shoot_mlflow(context, out: Path, base: str, model: str, auth: dict[str, str]) -> None:
    """`auth`: MLflow basic-auth header of the read-only serving identity (the context has its credentials)."""
    page = context.new_page()
    page.set_viewport_size({"width": 1440, "height": 1080})  # the versions table with its aliases fits
    page.goto(f"{base}/#/models/{model}", wait_until="load", timeout=TIMEOUT_MS)
    page.get_by_text("@ champion").or_(page.get_by_text("champion", exact=True)).first.wait_for(
        timeout=TIMEOUT_MS)
    close_mlflow_assistant(page)
    page.wait_for_timeout(1000)
    save_shot(page, out / "mlflow-registry.png")

    run_id = _get_json(f"{base}/api/2.0/mlflow/registered-models/alias?name={model}&alias=champion", auth)[
        "model_version"]["run_id"]
    experiment_id = _get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", auth)["run"]["info"]["experiment_id"]
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}", wait_until="load",
              timeout=TIMEOUT_MS)
    page.get_by_text("test_balanced_accuracy").first.wait_for(timeout=TIMEOUT_MS)
    close_mlflow_assistant(page)
    search = page.get_by_placeholder("Search metrics")
    search.fill("test_")  # the held-out test metrics the gate compares, not the per-epoch curves
    search.scroll_into_view_if_needed()
    page.mouse.wheel(0, 250)
    page.wait_for_timeout(1000)
    save_shot(page, out / "mlflow-run.png")
    page.close()


def shoot_serving(context, out: Path, base: str, image: Path) -> None:
    page = context.new_page()
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(base + "/", wait_until="networkidle", timeout=TIMEOUT_MS)
    page.wait_for_selector("#ready-dot.ready", timeout=TIMEOUT_MS)
    drop_file(page, "#dropzone", image)
    page.wait_for_selector("#result:not([hidden])", timeout=TIMEOUT_MS)
    page.wait_for_function("() => { const i = document.getElementById('cam-image');"
                           " return i && i.complete && i.naturalWidth > 0; }", timeout=TIMEOUT_MS)
    page.wait_for_timeout(800)
    save_shot(page, out / "serving-page.png", full_page=True)
    page.close()


def fetch_batch_results(settings, dataset: str, batch_id: str, folder: Path) -> Path:
    """The newest complete scoring of a batch (summary.json is written last), copied to `folder` with
    its previews, so report.html's relative image links resolve; returns the report's path."""
    from contracts.screening import REPORT_FILE, RESULTS_ROOT, SUMMARY_FILE, check_batch_id
    from pipeline.storage import iter_objects, s3_client

    client = s3_client(settings)
    prefix = f"{RESULTS_ROOT}/{dataset}/{check_batch_id(batch_id)}/"
    keys = [obj["Key"][len(prefix):] for obj in iter_objects(client, settings.s3_bucket, prefix)]
    complete = [k.split("/", 1)[0] for k in keys if k.endswith(f"/{SUMMARY_FILE}") and k.count("/") == 1]
    if not complete:
        raise SystemExit(f"batch {batch_id!r} of {dataset!r} has no complete scoring under {prefix}")
    version = max(complete, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v))
    for key in keys:
        if key.startswith(f"{version}/"):
            target = folder / key[len(version) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(settings.s3_bucket, prefix + key, str(target))
    return folder / REPORT_FILE


def shoot_batch_report(context, out: Path, report: Path) -> None:
    """The top of the report: header, counts, drift and the first ranked rows with their previews."""
    page = context.new_page()
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(report.as_uri(), wait_until="load", timeout=TIMEOUT_MS)
    page.evaluate("() => Promise.all([...document.images].map(i => (i.loading = 'eager', i.decode()"
                  ".catch(() => null))))")
    height = min(1500, page.evaluate("document.documentElement.scrollHeight"))
    save_shot(page, out / "batch-report.png", full_page=True, clip={"x": 0, "y": 0, "width": 1280, "height": height})
    page.close()


def shoot_review_page(context, out: Path, base: str, batch_id: str, reviewer_key: str) -> None:
    """The batch's review queue on a laptop-sized window, as a reviewer sees it after entering their key."""
    page = context.new_page()
    page.set_viewport_size({"width": 1366, "height": 768})
    page.goto(f"{base}/batches/{batch_id}", wait_until="load", timeout=TIMEOUT_MS)
    page.fill("#key-input", reviewer_key)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#queue li').length > 0", timeout=TIMEOUT_MS)
    page.wait_for_function("document.getElementById('d-heat').naturalWidth > 0", timeout=TIMEOUT_MS)
    page.wait_for_timeout(800)
    save_shot(page, out / "review-page.png")
    page.close()


def first_reviewer_key(settings) -> str:
    """The key of the first SERVING_REVIEWER_API_KEYS entry (`name:key` or a bare key), or ""."""
    entries = settings.key_list(settings.serving_reviewer_api_keys)
    return entries[0].rpartition(":")[2] if entries else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "scripts" / "screenshots")
    parser.add_argument("--image", type=Path, help="image dropped on the serving page (default: a real smear)")
    parser.add_argument("--only", choices=["airflow", "mlflow", "serving", "batch"], action="append")
    parser.add_argument("--batch", default=DEMO_BATCH_ID, help="scored batch of the report and review page")
    parser.add_argument("--reviewer-key", help="key the review page is opened with (default: the first of "
                        "SERVING_REVIEWER_API_KEYS)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    s = get_settings()
    dataset = s.dataset
    only = set(args.only or ["airflow", "mlflow", "serving", "batch"])
    if "airflow" in only:
        from ops.airflow_local import SECRETS_FILE, admin_password

        site = airflow_site(s, admin_key="")
        if not (site.home / SECRETS_FILE).is_file():
            print("no Airflow site found: run `make demo` first", file=sys.stderr)
            return 2
        password = admin_password(site)
    reviewer_key = args.reviewer_key or first_reviewer_key(s)
    args.out.mkdir(parents=True, exist_ok=True)
    with (tempfile.TemporaryDirectory(prefix="hemaflow-shots-") as profile,
          tempfile.TemporaryDirectory(prefix="hemaflow-batch-") as results, sync_playwright() as pw):
        # MLflow asks for basic auth: the browser answers with serving's read-only identity.
        reader = {"username": s.serving_mlflow_username, "password": s.serving_mlflow_password.get_secret_value()}
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT,
            http_credentials=reader)
        try:
            if "airflow" in only:
                shoot_airflow(context, args.out, f"http://127.0.0.1:{s.airflow_port}", password,
                              f"hemaflow_retrain_{dataset}")
            if "mlflow" in only:
                from serving.registry import basic_auth

                auth = {"Authorization": basic_auth(reader["username"], reader["password"]) or ""}
                shoot_mlflow(context, args.out, s.mlflow_tracking_uri, s.model_name(dataset), auth)
            if "serving" in only:
                shoot_serving(context, args.out, f"http://127.0.0.1:{s.serving_port}",
                              args.image or demo_image(dataset))
            if "batch" in only:
                report = fetch_batch_results(s, dataset, args.batch, Path(results))
                shoot_batch_report(context, args.out, report)
                if reviewer_key:
                    shoot_review_page(context, args.out, f"http://127.0.0.1:{s.serving_port}", args.batch,
                                      reviewer_key)
                else:
                    print("review-page.png skipped: no reviewer key (--reviewer-key or SERVING_REVIEWER_API_KEYS)",
                          file=sys.stderr)
        finally:
            context.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
