"""`python -m pipeline upload` emits the dataset's raw Asset event through a real Airflow api-server.

One `airflow api-server` (simple auth manager, a known password) runs on a free loopback port
against the DAG tests' AIRFLOW_HOME, after `airflow dags reserialize` put the HemaFlow DAGs and
their Assets in its database. The upload runs as the real CLI against the real local stack.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from ops.supervisor import free_port
from tests.dags.airflow_home import AIRFLOW_ENV
from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DATASET = "pbc8"  # the retraining tests use leukemia; the objects are deleted again (the watcher test needs it empty)
RETRAIN_DAG_ID = f"hemaflow_retrain_{DATASET}"
API_PROCESS = "airflow-api-test"
API_START_TIMEOUT_S = 120.0


def _airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="module")
def airflow_api(local_stack, airflow_db, tmp_path_factory):
    """{url, username, password} of a running api-server whose DB knows the HemaFlow Assets."""
    from ops import supervisor

    # The DAG files import `pipeline` (pytest's pythonpath does not reach subprocesses).
    env = {**os.environ, **AIRFLOW_ENV,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([_airflow_bin(), "dags", "reserialize"], env=env, capture_output=True, text=True,
                          timeout=180, cwd=REPO_ROOT)
    assert done.returncode == 0, f"airflow dags reserialize failed:\n{(done.stdout + done.stderr)[-3000:]}"

    password = secrets.token_urlsafe(16)
    passwords_file = tmp_path_factory.mktemp("airflow-auth") / "passwords.json"
    passwords_file.write_text(json.dumps({"admin": password}))
    port = free_port()
    server_env = {
        **env,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
    }
    url = f"http://127.0.0.1:{port}"
    # The server retitles itself ("airflow api_server"); the stack still knows it by pid + start time.
    supervisor.start_process(local_stack, API_PROCESS, [_airflow_bin(), "api-server"], env=server_env, cwd=REPO_ROOT)
    try:
        _, log, _ = supervisor.process_paths(local_stack, API_PROCESS)
        supervisor.wait_until(lambda: supervisor.http_ok(url + "/api/v2/version"), "airflow api-server", log,
                         lambda: supervisor.read_pid(local_stack, API_PROCESS), timeout_s=API_START_TIMEOUT_S)
        yield {"url": url, "username": "admin", "password": password}
    finally:
        supervisor.stop_process(local_stack, API_PROCESS)


@pytest.fixture
def upload_tree_dir(tmp_path, local_stack, s3):
    """A factory of small new image trees for DATASET; every uploaded object is deleted afterwards."""
    from PIL import Image

    from contracts.dataset_spec import load_spec

    spec = load_spec(DATASET)

    def make(tag: str, per_class: int = 2) -> Path:
        root = tmp_path / tag
        for c, folder in enumerate(spec.class_folders[:2]):
            (root / folder).mkdir(parents=True)
            for i in range(per_class):
                buf = io.BytesIO()
                Image.new("RGB", (48, 48), (c * 90, i * 40, secrets.randbelow(256))).save(buf, format="PNG")
                (root / folder / f"{tag}-{i}.png").write_bytes(buf.getvalue())
        return root

    yield make
    from pipeline.storage import iter_objects

    for obj in list(iter_objects(s3, local_stack.s3_bucket, spec.s3_prefix)):
        s3.delete_object(Bucket=local_stack.s3_bucket, Key=obj["Key"])


def _upload_cli(root: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "upload", str(root), "--dataset", DATASET],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def _api(airflow_api: dict):
    import httpx

    token = httpx.post(airflow_api["url"] + "/auth/token", timeout=10,
                       json={"username": airflow_api["username"], "password": airflow_api["password"]})
    assert token.status_code == 201, token.text
    return httpx.Client(base_url=airflow_api["url"], timeout=10,
                        headers={"Authorization": f"Bearer {token.json()['access_token']}"})


def _upload_events(client, asset_id: int) -> list[dict]:
    r = client.get("/api/v2/assets/events", params={"asset_id": asset_id, "limit": 100})
    assert r.status_code == 200, r.text
    return [e for e in r.json()["asset_events"] if e["extra"].get("source") == "hemaflow-upload"]


def test_upload_emits_the_raw_asset_event_and_queues_retraining(airflow_api, upload_tree_dir, local_stack):
    from contracts.dataset_spec import load_spec
    from pipeline.watch import raw_asset_name, raw_asset_uri

    uri = raw_asset_uri(local_stack.s3_bucket, load_spec(DATASET).s3_prefix)
    with _api(airflow_api) as client:
        assets = client.get("/api/v2/assets", params={"name_pattern": raw_asset_name(DATASET)}).json()["assets"]
        asset = next(a for a in assets if a["name"] == raw_asset_name(DATASET))
        assert asset["uri"] == uri
        before = _upload_events(client, asset["id"])

        root = upload_tree_dir("first")
        api_env = {"AIRFLOW_API_URL": airflow_api["url"], "AIRFLOW_API_USERNAME": airflow_api["username"],
                   "AIRFLOW_API_PASSWORD": airflow_api["password"]}
        done = _upload_cli(root, **api_env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "4 uploaded" in done.stdout and f"emitted to {airflow_api['url']}" in done.stdout, done.stdout
        assert airflow_api["password"] not in done.stdout + done.stderr

        events = _upload_events(client, asset["id"])
        assert len(events) == len(before) + 1
        new = events[-1]
        assert (new["extra"]["dataset"], new["extra"]["uploaded"], new["extra"]["from_rest_api"]) == (DATASET, 4, True)
        queued = client.get(f"/api/v2/dags/{RETRAIN_DAG_ID}/assets/queuedEvents").json()["queued_events"]
        assert [q["asset_id"] for q in queued] == [asset["id"]]  # the scheduler would start the retraining run

        again = _upload_cli(root, **api_env)  # nothing new: no event
        assert again.returncode == 0 and "0 uploaded" in again.stdout, again.stdout + again.stderr
        assert "nothing new uploaded: no asset event" in again.stdout
        assert len(_upload_events(client, asset["id"])) == len(before) + 1


def test_upload_without_airflow_api_url_says_the_watcher_will_pick_it_up(upload_tree_dir):
    done = _upload_cli(upload_tree_dir("unset"), AIRFLOW_API_URL="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 uploaded" in done.stdout
    assert "the watcher DAG will pick the upload up within RAW_WATCH_SCHEDULE" in done.stdout


def test_wrong_airflow_password_warns_but_the_upload_succeeds(airflow_api, upload_tree_dir, s3, local_stack):
    from contracts.dataset_spec import load_spec
    from pipeline.storage import iter_objects

    wrong = "wrong-" + secrets.token_hex(8)
    done = _upload_cli(upload_tree_dir("wrongpw"), AIRFLOW_API_URL=airflow_api["url"],
                       AIRFLOW_API_USERNAME=airflow_api["username"], AIRFLOW_API_PASSWORD=wrong)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "4 uploaded" in done.stdout
    assert "WARNING could not emit the Airflow asset event" in done.stdout
    assert "rejected user 'admin' (HTTP 401)" in done.stdout and "AIRFLOW_API_PASSWORD" in done.stdout
    assert wrong not in out and airflow_api["password"] not in out
    keys = [o["Key"] for o in iter_objects(s3, local_stack.s3_bucket, load_spec(DATASET).s3_prefix)]
    assert len([k for k in keys if "/wrongpw-" in k]) == 4


def test_unreachable_airflow_is_a_bounded_non_fatal_warning(local_stack):
    from pipeline.airflow_api import AirflowApiError, announce_upload, emit_raw_asset_event

    s = local_stack.model_copy(update={"airflow_api_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(AirflowApiError, match="failed after 3 attempts"):
        emit_raw_asset_event(DATASET, settings=s)
    result = announce_upload(DATASET, {"uploaded": 1, "prefix": "raw/pbc8/", "bytes": 10}, settings=s)
    assert result["emitted"] is False and "the upload itself succeeded" in result["message"]


def test_submit_emits_the_inbox_asset_event_with_the_batch_id(airflow_api, upload_tree_dir, local_stack, s3):
    """`pipeline submit` of a nested folder: the batch lands in inbox/ and the scoring DAG is queued."""
    from pipeline.storage import iter_objects
    from screening.batches import inbox_asset_name, inbox_asset_uri

    root = upload_tree_dir("batch")  # two nested folders: a batch keeps them as they are
    batch = "submit-test-1"
    api_env = {"AIRFLOW_API_URL": airflow_api["url"], "AIRFLOW_API_USERNAME": airflow_api["username"],
               "AIRFLOW_API_PASSWORD": airflow_api["password"]}
    try:
        with _api(airflow_api) as client:
            assets = client.get("/api/v2/assets", params={"name_pattern": inbox_asset_name(DATASET)}).json()["assets"]
            asset = next(a for a in assets if a["name"] == inbox_asset_name(DATASET))
            assert asset["uri"] == inbox_asset_uri(local_stack.s3_bucket, DATASET)
            done = subprocess.run([sys.executable, "-m", "pipeline", "submit", str(root), "--dataset", DATASET,
                                   "--batch", batch], env={**os.environ, **api_env}, capture_output=True, text=True,
                                  timeout=120, cwd=REPO_ROOT)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"batch {batch}: 4 uploaded" in done.stdout and f"hemaflow_score_{DATASET} is queued" in done.stdout
            assert airflow_api["password"] not in done.stdout + done.stderr
            r = client.get("/api/v2/assets/events", params={"asset_id": asset["id"], "limit": 100})
            extras = [e["extra"] for e in r.json()["asset_events"] if e["extra"].get("source") == "hemaflow-submit"]
            assert [(x["batch_id"], x["uploaded"]) for x in extras] == [(batch, 4)]
            queued = client.get(f"/api/v2/dags/hemaflow_score_{DATASET}/assets/queuedEvents").json()["queued_events"]
            assert [q["asset_id"] for q in queued] == [asset["id"]]
        keys = sorted(o["Key"] for o in iter_objects(s3, local_stack.s3_bucket, f"inbox/{DATASET}/{batch}/"))
        assert len(keys) == 4 and all(k.count("/") == 4 for k in keys)  # inbox/<d>/<batch>/<folder>/<file>
    finally:
        for obj in list(iter_objects(s3, local_stack.s3_bucket, f"inbox/{DATASET}/")):
            s3.delete_object(Bucket=local_stack.s3_bucket, Key=obj["Key"])
