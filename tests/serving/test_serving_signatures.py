"""Signed bundles: a bundle with valid checksums but no, a wrong or an unknown signature is refused
(counted and logged by reason, the old model keeps serving); a key rotated in is accepted."""

from __future__ import annotations

import shutil

import httpx
import pytest

from contracts.signing import generate_key_pair
from tests.fixtures.keys import PUBLIC_KEY
from tests.serving.support import forge, image_bytes, point_link

pytestmark = pytest.mark.slow

ADMIN = {"X-API-Key": "sig-admin-key-0123456789"}


def _reload(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/admin/reload", headers=ADMIN, timeout=60)


def test_forged_bundles_are_refused_and_the_old_model_keeps_serving(serving_server, serving_bundles, tmp_path):
    link = tmp_path / "current"
    point_link(link, serving_bundles["good"])
    server = serving_server({"SERVING_BUNDLE_PATH": str(link), "SERVING_ADMIN_API_KEYS": ADMIN["X-API-Key"]})
    url = server.url
    before = httpx.get(f"{url}/v1/model").json()
    assert before["signed_by"]  # the id of the pinned key that verified it

    for name, reason in (("unsigned", "unsigned"), ("forged_other_key", "unknown_key"),
                         ("forged_stale_sig", "bad_signature")):
        point_link(link, serving_bundles[name])
        r = _reload(url)
        assert r.status_code == 409 and r.json()["reason"].startswith(reason), (name, r.text)
        assert httpx.get(f"{url}/readyz").status_code == 200
        model = httpx.get(f"{url}/v1/model").json()
        assert model["model"]["version"] == before["model"]["version"] and model["threshold"] == before["threshold"]

    # Predictions still come from the genuine model (the forgeries lowered the threshold).
    r = httpx.post(f"{url}/v1/predict", files={"file": ("x.png", image_bytes("PNG"), "image/png")})
    assert r.status_code == 200 and r.json()["threshold"] == before["threshold"]
    metrics = httpx.get(f"{url}/metrics").text
    for reason in ("unsigned", "unknown_key", "bad_signature"):
        assert f'hemaflow_model_reload_failures_total{{reason="{reason}"}} 1.0' in metrics
        assert f"model reload refused ({reason}" in server.log()


def test_key_rotation_new_key_accepted_old_key_dropped(serving_server, serving_bundles, tmp_path):
    new_private, new_public = generate_key_pair()
    rotated = forge(serving_bundles["good2"], tmp_path / "rotated", new_private)  # signed by the new key only

    # Step 1 of a rotation: serving trusts the old and the new key; both kinds of bundle load.
    link = tmp_path / "current"
    point_link(link, serving_bundles["good"])
    server = serving_server({"SERVING_BUNDLE_PATH": str(link), "SERVING_ADMIN_API_KEYS": ADMIN["X-API-Key"],
                             "BUNDLE_TRUSTED_PUBLIC_KEYS": f"{PUBLIC_KEY},{new_public}"})
    old_kid = httpx.get(f"{server.url}/v1/model").json()["signed_by"]
    point_link(link, rotated)
    r = _reload(server.url)
    assert r.status_code == 200 and r.json()["changed"], r.text
    new_kid = httpx.get(f"{server.url}/v1/model").json()["signed_by"]
    assert new_kid and new_kid != old_kid

    # Step 3: the old key is dropped; what it signed is refused, what the new key signed is served.
    old_only = tmp_path / "old-signed"
    shutil.copytree(serving_bundles["good"], old_only)
    link2 = tmp_path / "current2"
    point_link(link2, old_only)
    server2 = serving_server({"SERVING_BUNDLE_PATH": str(link2), "SERVING_ADMIN_API_KEYS": ADMIN["X-API-Key"],
                              "BUNDLE_TRUSTED_PUBLIC_KEYS": new_public}, wait_ready=False)
    ready = httpx.get(f"{server2.url}/readyz")
    assert ready.status_code == 503 and ready.json()["last_error"].startswith("unknown_key")
    point_link(link2, rotated)
    assert _reload(server2.url).status_code == 200
    assert httpx.get(f"{server2.url}/v1/model").json()["signed_by"] == new_kid
