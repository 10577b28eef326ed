"""Screenshots of the running demo's Airflow and MLflow UIs for the README (`make demo` first).

    .venv/bin/python -m scripts.screenshots [--out dags/docs]

Logs in to Airflow with the demo's generated admin password (a JWT from /auth/token, set as
the UI's `_token` cookie) and drives Debian's Chromium through Playwright.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.request
from pathlib import Path

from pipeline.settings import PROJECT_ROOT, get_settings
from scripts.demo import airflow_password


def airflow_token(base: str, password: str) -> str:
    req = urllib.request.Request(f"{base}/auth/token", data=json.dumps({"username": "admin", "password": password})
                                 .encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())["access_token"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "dags" / "docs")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    s = get_settings()
    dataset = s.dataset
    airflow = f"http://127.0.0.1:{s.airflow_port}"
    password = airflow_password(s)
    if not password:
        print("no Airflow password found: run `make demo` first", file=sys.stderr)
        return 2
    token = airflow_token(airflow, password)
    args.out.mkdir(parents=True, exist_ok=True)
    pages = {
        "airflow-retrain-dag.png": f"{airflow}/dags/hemaflow_retrain_{dataset}",
        "airflow-retrain-graph.png": f"{airflow}/dags/hemaflow_retrain_{dataset}/tasks",
        "mlflow-registry.png": f"{s.mlflow_tracking_uri}/#/models/{s.model_name(dataset)}",
        "mlflow-pipeline-runs.png": f"{s.mlflow_tracking_uri}/#/experiments",
    }
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium") or None, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.add_cookies([{"name": "_token", "value": token, "url": airflow}])
        page = context.new_page()
        for name, url in pages.items():
            page.goto(url, wait_until="load", timeout=60_000)
            page.wait_for_timeout(4000)
            page.screenshot(path=str(args.out / name))
            print(f"{args.out / name}  <- {url}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
