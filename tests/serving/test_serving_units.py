"""Fast unit tests of the serving pieces that need no server: Grad-CAM maths, checksums, context."""

from __future__ import annotations

import numpy as np
import pytest

from contracts import gradcam
from serving.deps import key_matches
from contracts.bundle import BundleError, parse_sums, verify_checksums
from serving.clinical import SCREENING_NOTE, context_for


def test_jet_colormap_endpoints_and_middle():
    colours = gradcam.jet(np.array([0.0, 0.5, 1.0]))
    assert colours[0].tolist() == [0, 0, 128]  # dark blue
    assert colours[1].tolist() == [128, 255, 128]  # green-ish centre
    assert colours[2].tolist() == [128, 0, 0]  # dark red


def test_cam_is_rectified_normalised_and_upsampled():
    cam = np.array([[-3.0, 0.0], [1.0, 2.0]])
    norm = gradcam.normalise_cam(cam)
    assert norm.min() == 0.0 and norm.max() == 1.0 and norm[0, 0] == 0.0
    assert gradcam.normalise_cam(np.full((2, 2), -1.0)).max() == 0.0  # nothing supports the class
    up = gradcam.upsample(norm, 16)
    assert up.shape == (16, 16) and up[-1, -1] > up[0, 0]


def test_overlay_blends_heat_where_the_map_is_high():
    image = np.full((32, 32, 3), 128, np.uint8)
    cam = np.zeros((4, 4))
    cam[3, 3] = 5.0
    out = gradcam.overlay(image, cam)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[-1, -1, 0] > out[0, 0, 0]  # red where the evidence is
    assert out[0, 0, 2] > out[0, 0, 0]  # blue where there is none


def test_checksums_reject_tampering_and_path_tricks():
    files = {"model.tflite": b"m", "bundle.json": b"{}"}
    import hashlib

    sums = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n" for k, v in files.items())
    verify_checksums({**files, "SHA256SUMS": sums.encode()})
    with pytest.raises(BundleError) as err:
        verify_checksums({**files, "model.tflite": b"x", "SHA256SUMS": sums.encode()})
    assert err.value.reason == "checksum_mismatch"
    with pytest.raises(BundleError):
        parse_sums("0" * 64 + "  ../etc/passwd\n")
    with pytest.raises(BundleError):
        verify_checksums(files)


@pytest.mark.parametrize("label", ["normal", "abnormal", "Benign", "Early", "Pre", "Pro", "basophil", "eosinophil",
                                   "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"])
def test_every_known_label_has_clinical_context(label):
    ctx = context_for(label)
    assert ctx["what"] and ctx["increase"] and ctx["title"] != label.lower()
    assert ctx["note"] == SCREENING_NOTE and "not a diagnosis" in ctx["note"]


def test_white_cell_types_state_their_normal_share():
    for label in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"):
        assert "%" in context_for(label)["normal_share"]
    assert context_for("mystery")["note"] == SCREENING_NOTE


def test_key_compare():
    assert key_matches("b", ["a", "b"]) and not key_matches("c", ["a", "b"]) and not key_matches("a", [])


USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcd"


def test_overriding_the_settings_dependency_changes_who_may_predict_and_reload(tmp_path):
    """Auth reads the settings through `serving.deps.get_settings`, so `app.dependency_overrides`
    locks a running app down (prediction and admin keys) without rebuilding it; probes stay open."""
    from fastapi.testclient import TestClient

    from contracts.settings import Settings
    from serving import deps
    from serving.app import create_app
    from tests.fixtures.keys import PUBLIC_KEY

    base = {"serving_bundle_path": tmp_path / "no-bundle-yet", "serving_poll_interval_s": 0,
            "bundle_trusted_public_keys": PUBLIC_KEY}
    locked = Settings(**base, serving_require_api_key=True, serving_api_keys=USER_KEY,
                      serving_admin_api_keys=ADMIN_KEY)
    app = create_app(Settings(**base))
    with TestClient(app) as client:
        # As built: prediction is open (it gets past auth to "no model yet"); there are no admin keys.
        assert client.post("/v1/predict").json()["error"] == "no_model"
        assert client.post("/v1/admin/reload", headers={"X-API-Key": ADMIN_KEY}).status_code == 403

        app.dependency_overrides[deps.get_settings] = lambda: locked
        r = client.post("/v1/predict")
        assert r.status_code == 401 and r.json()["error"] == "api_key_missing"
        r = client.post("/v1/explain", headers={"X-API-Key": "not-" + USER_KEY})
        assert r.status_code == 403 and r.json()["error"] == "api_key_invalid"
        r = client.post("/v1/predict/batch", headers={"X-API-Key": USER_KEY})
        assert r.status_code == 503 and r.json()["error"] == "no_model"
        assert client.post("/v1/admin/reload", headers={"X-API-Key": USER_KEY}).status_code == 403
        r = client.post("/v1/admin/reload", headers={"X-API-Key": ADMIN_KEY})  # the manager really reloads
        assert r.status_code == 409 and r.json()["reason"].startswith("missing:")
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 503

        app.dependency_overrides.clear()
        assert client.post("/v1/predict").json()["error"] == "no_model"


def test_runner_pool_never_shares_a_runner_between_threads():
    """Each concurrent call gets a runner no other thread holds (LiteRT interpreters are not thread-safe)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from serving.runners import RunnerPool

    in_use: set[int] = set()
    overlaps: list[int] = []
    most = [0]
    guard = threading.Lock()

    def make(i: int):
        def run(**_):
            with guard:
                if i in in_use:
                    overlaps.append(i)
                in_use.add(i)
                most[0] = max(most[0], len(in_use))
            time.sleep(0.002)
            with guard:
                in_use.discard(i)
            return {"who": i}
        return run

    pool = RunnerPool([make(i) for i in range(3)])
    with ThreadPoolExecutor(8) as ex:
        who = list(ex.map(lambda _: pool(x=1)["who"], range(200)))
    assert overlaps == [] and set(who) == {0, 1, 2}
    assert most[0] >= 2  # runners really ran at the same time


def test_every_interpreter_of_a_model_gives_the_canary_answers(tiny_bundle_dir):
    """load_bundle(interpreters=3): each pooled interpreter is the verified model (same outputs)."""
    from contracts.bundle import read_local_bundle
    from serving.bundle import load_bundle
    from contracts.signing import parse_public_keys
    from tests.fixtures.keys import PUBLIC_KEY

    model = load_bundle(read_local_bundle(tiny_bundle_dir), trusted_keys=parse_public_keys(PUBLIC_KEY), interpreters=3)
    assert model._runner.size == 3
    x = np.random.default_rng(0).integers(0, 255, (1, model.image_size, model.image_size, 3)).astype(np.uint8)
    outs = [model.predict(x) for _ in range(6)]  # the pool hands runners out in turn
    for probs, maps in outs[1:]:
        assert np.array_equal(probs, outs[0][0]) and np.array_equal(maps, outs[0][1])


def test_a_lone_call_runs_on_the_solo_runner_and_concurrent_ones_spread():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serving.runners import RunnerPool

    barrier = threading.Barrier(2, timeout=5)

    def runner(name: str, wait: bool = False):
        def run(**_):
            if wait:
                barrier.wait()  # both pooled runners busy at the same moment
            return {"who": name}
        return run

    pool = RunnerPool([runner("a", True), runner("b", True)], solo=runner("solo"))
    assert {pool(x=1)["who"] for _ in range(5)} == {"solo"}  # one at a time: always the solo interpreter
    # Two calls held in flight together: the first may take the solo runner, so hold it busy too.
    pool = RunnerPool([runner("a", True), runner("b", True)], solo=runner("solo", True))
    with ThreadPoolExecutor(3) as ex:
        who = sorted(ex.map(lambda _: pool(x=1)["who"], range(2)))
    assert len(set(who)) == 2  # never the same runner twice at once


@pytest.mark.parametrize("solo_ms, pooled_ms, expected", [(1, 20, "solo"), (20, 1, "pooled")])
def test_lone_calls_go_to_the_interpreter_measured_faster(solo_ms, pooled_ms, expected):
    """A lone call uses the solo (multi-threaded) interpreter only while it is faster per image than a
    pooled one; the other is re-measured every EXPLORE_EVERY-th lone call, so a loaded machine that
    slows the solo interpreter moves lone calls to single-threaded runners (and back)."""
    import time

    from serving.runners import EXPLORE_EVERY, RunnerPool

    def runner(name: str, ms: float):
        def run(images):
            time.sleep(ms * len(images) / 1000)
            return {"who": name}
        return run

    pool = RunnerPool([runner("pooled", pooled_ms)], solo=runner("solo", solo_ms))
    batch = np.zeros((2, 4, 4, 3), np.float32)
    who = [pool(batch)["who"] for _ in range(3 * EXPLORE_EVERY)]
    assert who[0] == "solo" and who[EXPLORE_EVERY - 1] == "pooled"  # starts on solo, then measures the other
    settled = who[EXPLORE_EVERY:]
    assert settled.count(expected) >= len(settled) - 3, who  # at most the re-measuring calls go elsewhere
    assert pool.prefers_solo() == (expected == "solo")


def test_serving_preprocesses_with_the_crop_policy_the_bundle_records():
    """bundle.json preprocessing.crop reaches prepare_image; older bundles (no crop) mean center_crop."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from contracts.imaging import prepare_image
    from contracts.settings import get_settings
    from serving.inference import crop_policy, prepare

    field = np.full((240, 320, 3), 180, dtype=np.uint8)
    field[100:140, 5:45] = (30, 30, 200)  # a cell at the left edge
    buf = io.BytesIO()
    Image.fromarray(field).save(buf, format="PNG")
    fit_model = SimpleNamespace(meta={"preprocessing": {"policy": "resize_longer_pad_square", "crop": "fit"}})
    old_model = SimpleNamespace(meta={"preprocessing": {"policy": "resize_shorter_center_crop"}})
    assert crop_policy(fit_model) == "fit" and crop_policy(old_model) == "center_crop"
    served = prepare(buf.getvalue(), 64, get_settings(), crop_policy(fit_model))
    assert np.array_equal(served, prepare_image(buf.getvalue(), 64, crop="fit"))
    assert not np.array_equal(served, prepare(buf.getvalue(), 64, get_settings(), crop_policy(old_model)))
