"""What reaches serving through the registry is checked, whatever MLflow says.

A private stack (its own SeaweedFS + MLflow, so S3 can really be stopped) gets model versions
published the way a forger with MLflow write access could: runs with a `serving_bundle/` made
by the test, registered and given `@champion`. Serving (a real `python -m serving` process in
registry mode) must swap in only genuinely signed bundles that name their own run and model,
and must keep serving, ready, while S3 behind MLflow is down.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from contracts.signing import generate_key_pair
from tests.helpers import patched_environ
from tests.fixtures.keys import OTHER_SIGNING_KEY, PUBLIC_KEY, SIGNING_KEY
from tests.serving.support import image_bytes, resum

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DATASET = "secreg"
ADMIN_KEY = "registry-admin-key-0123456789"
NEW_SIGNING_KEY, NEW_PUBLIC_KEY = generate_key_pair()  # a key rotated in during the test


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    """A private SeaweedFS + MLflow for this module only; yields (settings, env)."""
    from ops import stack
    from contracts.settings import get_settings
    from ops.stack import private_stack_env

    env = private_stack_env(tmp_path_factory.mktemp("secreg-home"), bucket="hemaflow-secreg")
    env.update({"BUNDLE_SIGNING_KEY": SIGNING_KEY, "BUNDLE_TRUSTED_PUBLIC_KEYS": PUBLIC_KEY, "DATASET": DATASET})
    with patched_environ(env):
        settings = get_settings()
        stack.up(settings)
        try:
            yield settings, env
        finally:
            stack.down(settings)


class Publisher:
    """Publishes bundles as new model versions holding @champion (what a registry writer can do)."""

    def __init__(self, settings, env: dict[str, str], source: Path, work: Path) -> None:
        self.settings, self.env, self.source, self.work = settings, env, source, work
        self.model_name = settings.model_name(DATASET)
        self.count = 0

    def publish(self, *, sign_with: str | None = SIGNING_KEY, run_id: str | None = None,
                model_name: str | None = None, corrupt: bool = False, **meta_changes) -> tuple[str, str]:
        """A new run whose bundle.json names `run_id` (default: the run itself) and `model_name`
        (default: the registered model), signed with `sign_with` (None: unsigned); `corrupt` flips
        a byte of model.tflite after signing; sign_with="stale" keeps the source's signature, which
        no longer matches the rewritten checksums. Returns (model version, run id)."""
        from mlflow import MlflowClient

        self.count += 1
        with patched_environ(self.env):
            client = MlflowClient(self.settings.mlflow_tracking_uri)
            exp = client.get_experiment_by_name("secreg-publish")
            exp_id = exp.experiment_id if exp else client.create_experiment("secreg-publish")
            run = client.create_run(exp_id)
            rid = run.info.run_id
            staged = self.work / f"bundle-{self.count}"
            shutil.copytree(self.source, staged)
            meta = json.loads((staged / "bundle.json").read_text())
            meta.update({"run_id": run_id or rid, "model_name": model_name or self.model_name, **meta_changes})
            (staged / "bundle.json").write_text(json.dumps(meta))
            if sign_with != "stale":  # "stale": keep the genuine signature of the original checksums
                (staged / "SHA256SUMS.sig").unlink()
            resum(staged, None if sign_with == "stale" else sign_with)
            if corrupt:
                blob = bytearray((staged / "model.tflite").read_bytes())
                blob[len(blob) // 2] ^= 0xFF
                (staged / "model.tflite").write_bytes(bytes(blob))
            client.log_artifacts(rid, str(staged), "serving_bundle")
            client.set_terminated(rid)
            try:
                client.create_registered_model(self.model_name)
            except Exception:  # noqa: BLE001 - it exists after the first publish
                pass
            mv = client.create_model_version(self.model_name, f"{run.info.artifact_uri}/serving_bundle", run_id=rid)
            client.set_registered_model_alias(self.model_name, "champion", mv.version)
        return str(mv.version), rid


@pytest.fixture(scope="module")
def publisher(own_stack, serving_bundles, tmp_path_factory) -> Publisher:
    settings, env = own_stack
    return Publisher(settings, env, serving_bundles["good"], tmp_path_factory.mktemp("secreg-bundles"))


def _serving_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**env, "SERVING_ADMIN_API_KEYS": ADMIN_KEY, "SERVING_POLL_INTERVAL_S": "0", **extra}


def _reload(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/admin/reload", headers={"X-API-Key": ADMIN_KEY}, timeout=90)


def _serves(url: str, version: str) -> None:
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == version, ready.text
    r = httpx.post(f"{url}/v1/predict", files={"file": ("x.png", image_bytes("PNG"), "image/png")})
    assert r.status_code == 200 and r.json()["model"]["version"] == version, r.text


def test_registry_forgeries_are_refused_and_a_rotated_in_key_is_accepted(own_stack, publisher, serving_server):
    _, env = own_stack
    v1, run1 = publisher.publish()
    # Rotation step 1: serving trusts the current and the next key.
    server = serving_server(_serving_env(env, BUNDLE_TRUSTED_PUBLIC_KEYS=f"{PUBLIC_KEY},{NEW_PUBLIC_KEY}"))
    url = server.url
    model = httpx.get(f"{url}/v1/model").json()
    assert model["model"]["version"] == v1 and model["model"]["run_id"] == run1 and model["source"] == "registry"

    cases = {
        "checksum_mismatch": {"corrupt": True},  # a corrupt bundle arriving through the registry
        "run_mismatch": {"run_id": run1},  # genuinely signed, but copied from another run
        "model_mismatch": {"model_name": "hemaflow-pbc8"},  # genuinely signed, for another model
        "unsigned": {"sign_with": None, "threshold": 0.01},
        "unknown_key": {"sign_with": OTHER_SIGNING_KEY, "threshold": 0.01},  # valid checksums, forger's key
        "bad_signature": {"sign_with": "stale", "threshold": 0.01},  # valid checksums, signature of others
    }
    for reason, how in cases.items():
        version, _ = publisher.publish(**how)
        r = _reload(url)
        assert r.status_code == 409 and r.json()["reason"].startswith(reason), (reason, r.text)
        _serves(url, v1)  # the old model keeps serving, ready

    metrics = httpx.get(f"{url}/metrics").text
    log = server.log()
    for reason in cases:
        assert f'hemaflow_model_reload_failures_total{{reason="{reason}"}} 1.0' in metrics, reason
        assert f"model reload refused ({reason}" in log

    # A bundle signed by the rotated-in key is accepted.
    v_new, run_new = publisher.publish(sign_with=NEW_SIGNING_KEY)
    r = _reload(url)
    assert r.status_code == 200 and r.json()["changed"] and r.json()["version"] == v_new, r.text
    _serves(url, v_new)
    assert httpx.get(f"{url}/v1/model").json()["model"]["run_id"] == run_new


def test_polling_never_swaps_in_a_forged_champion(own_stack, publisher, serving_server):
    _, env = own_stack
    v_good, _ = publisher.publish()
    server = serving_server(_serving_env(env, SERVING_POLL_INTERVAL_S="0.5"))
    _serves(server.url, v_good)
    publisher.publish(sign_with=OTHER_SIGNING_KEY, threshold=0.01)
    deadline = time.monotonic() + 30
    while 'reason="unknown_key"' not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.3)
    _serves(server.url, v_good)


def test_rotation_without_retraining_re_signs_the_champion_with_the_new_key(own_stack, publisher, serving_server):
    """`python -m training sign`: the champion (here a bundle from before signing) is checked as
    serving would and signed with the new key; a server that trusts only the new key serves it."""
    from training.bundle import sign_registered_bundle

    from pydantic import SecretStr

    settings, env = own_stack
    signer = settings.model_copy(update={"bundle_signing_key": SecretStr(NEW_SIGNING_KEY)})
    version, _ = publisher.publish(sign_with=None)
    server = serving_server(_serving_env(env, BUNDLE_TRUSTED_PUBLIC_KEYS=NEW_PUBLIC_KEY), wait_ready=False)
    assert httpx.get(f"{server.url}/readyz").json()["last_error"].startswith("unsigned")
    with patched_environ(env):
        done = sign_registered_bundle(signer, publisher.model_name)
    assert done["version"] == version
    r = _reload(server.url)
    assert r.status_code == 200 and r.json()["version"] == version, r.text
    # A bundle whose signed metadata names another run is not adopted by re-signing either.
    _, run_other = publisher.publish()
    publisher.publish(run_id=run_other)
    with patched_environ(env), pytest.raises(Exception, match="refusing to sign"):
        sign_registered_bundle(signer, publisher.model_name)


def test_serving_with_wrong_mlflow_credentials_is_live_but_refused(own_stack, publisher, serving_server):
    _, env = own_stack
    publisher.publish()
    server = serving_server(_serving_env(env, SERVING_MLFLOW_PASSWORD="not-the-password-0123456789"),
                            wait_ready=False)
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 503 and ready.json()["last_error"].startswith("registry_auth"), ready.text
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_serving_stays_ready_while_s3_behind_mlflow_is_down(own_stack, publisher, serving_server):
    """Runs last in this module: it stops the module stack's S3."""
    from ops import supervisor

    settings, env = own_stack
    v_old, _ = publisher.publish()
    server = serving_server(_serving_env(env))
    _serves(server.url, v_old)
    v_next, _ = publisher.publish()  # a new champion whose files now sit behind a dead S3
    assert supervisor.stop_process(settings, "s3")
    # MLflow itself still answers (its metadata is in SQLite): only the artifact download fails.
    assert supervisor.http_ok(settings.mlflow_tracking_uri.rstrip("/") + "/health")
    r = _reload(server.url)
    assert r.status_code == 409 and r.json()["reason"].startswith("registry_unavailable"), r.text
    _serves(server.url, v_old)
    assert httpx.get(f"{server.url}/readyz").json()["last_error"].startswith("registry_unavailable")
    assert v_next != v_old
