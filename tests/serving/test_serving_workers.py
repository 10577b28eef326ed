"""SERVING_WORKERS > 1: an admin reload answered by one worker is followed by every worker before
it answers another request, so requests that start after the reload all get the new model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.serving.support import image_bytes, point_link

pytestmark = pytest.mark.slow

ADMIN_KEY = "workers-admin-key-0123456789"


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _versions(url: str, n: int) -> list[str]:
    """Each request on a fresh connection, so the kernel spreads them over the workers."""
    data = image_bytes("JPEG", size=(64, 64), seed=3)
    out = []
    for _ in range(n):
        r = httpx.post(f"{url}/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        out.append(r.json()["model"]["version"])
    return out


def test_every_worker_serves_the_model_an_admin_reload_swapped_in(serving_server, serving_bundles, tmp_path):
    link = tmp_path / "current"
    point_link(link, serving_bundles["good"])
    server = serving_server({"SERVING_BUNDLE_PATH": str(link), "SERVING_ADMIN_API_KEYS": ADMIN_KEY,
                             "SERVING_WORKERS": "2"})
    workers = [c for c in _children(server.proc.pid) if Path(f"/proc/{c}/cmdline").read_bytes().count(b"spawn")]
    assert len(workers) == 2, _children(server.proc.pid)
    for _ in range(100):  # both workers loaded (each answers /readyz for itself)
        if all(httpx.get(f"{server.url}/readyz").status_code == 200 for _ in range(10)):
            break
    v1 = set(_versions(server.url, 20))
    assert len(v1) == 1

    point_link(link, serving_bundles["good2"])
    r = httpx.post(f"{server.url}/v1/admin/reload", headers={"X-API-Key": ADMIN_KEY}, timeout=60)
    assert r.status_code == 200 and r.json()["changed"], r.text
    v2 = r.json()["version"]
    assert v2 not in v1
    assert set(_versions(server.url, 40)) == {v2}  # the worker that did not reload caught up first
    assert httpx.get(f"{server.url}/v1/model").json()["model"]["dataset_version"] == "tiny-v2"
    # The workers' shared folder holds the generation number only, and goes with the server.
    environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0") if b"=" in kv)
    sync_dir = Path(environ[b"HEMAFLOW_SERVING_SYNC_DIR"].decode())
    assert sorted(p.name for p in sync_dir.iterdir()) == ["generation", "generation.lock"]
    assert (sync_dir / "generation").read_text() == "1"
    server.stop()
    assert not sync_dir.exists()
