"""The servers benchmarks/serving.py measures: how each is started, made ready and stopped, and the
baselines it is compared with: a hand-made Flask + LiteRT app (FLASK_APP), HemaFlow's serving code
at an earlier commit (`checkout_baseline`), `mlflow models serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from benchmarks.serving_load import median_phases, tree_rss_mb

REPO = Path(__file__).resolve().parent.parent
FLASK_PHASES = [("sequential", 1, 150), ("c=8", 8, 300), ("c=32", 32, 600)]
MLFLOW_PHASES = [("sequential", 1, 50), ("c=8", 8, 100), ("c=32", 32, 200)]
DEFAULT_BASELINE_REF = "e502c04"  # the last commit before issue 14 (serving performance)

# The baseline a team would write by hand: one Flask route, decode, resize, invoke, jsonify.
FLASK_APP = """
import sys, threading
import numpy as np
from flask import Flask, jsonify, request
from PIL import Image
from ai_edge_litert.interpreter import Interpreter

model_path, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interpreter = Interpreter(model_path=model_path)
input_index = interpreter.get_input_details()[0]["index"]
interpreter.resize_tensor_input(input_index, [1, size, size, 3])
interpreter.allocate_tensors()
probs_index = [d["index"] for d in interpreter.get_output_details() if len(d["shape"]) == 2][0]
lock = threading.Lock()  # the interpreter is not thread-safe; Flask's server is threaded
app = Flask(__name__)


@app.route("/predict", methods=["POST"])
def predict():
    image = Image.open(request.files["file"].stream).convert("RGB").resize((size, size))
    batch = np.asarray(image, dtype=np.float32)[None]
    with lock:
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        probs = interpreter.get_tensor(probs_index)[0]
    return jsonify({"label": int(probs.argmax()), "probabilities": probs.tolist()})


@app.route("/ping")
def ping():
    return "ok"


app.run(host="127.0.0.1", port=port)
"""


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback
            return r.status == 200
    except Exception:
        return False


def _start(cmd: list[str], env: dict[str, str], ready_url: str, log: Path, timeout_s: float = 180,
           cwd: Path = REPO) -> tuple[subprocess.Popen, float]:
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                            cwd=str(cwd), start_new_session=True)
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited:\n{log.read_text(errors='replace')[-3000:]}")
        if _get_ok(ready_url):
            return proc, time.perf_counter() - t0
        time.sleep(0.02)
    stop_server(proc)
    raise RuntimeError(f"{cmd[:3]} not ready after {timeout_s}s:\n{log.read_text(errors='replace')[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)




def checkout_baseline(ref: str, into: Path) -> Path | None:
    """The serving code of `ref` (serving/ and pipeline/) in a folder of its own, or None without git."""
    into.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "serving", "pipeline"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  no baseline checkout of {ref}: {exc}", flush=True)
        return None
    return into



class Server:
    """One server under test: how to start it, its load-generator kind, phases and results."""

    def __init__(self, name: str, kind: str, cmd: list[str], env: dict[str, str], ready_path: str, port: int,
                 phases: list, large: bool, cwd: Path = REPO) -> None:
        self.name, self.kind, self.cmd, self.env, self.port = name, kind, cmd, env, port
        self.ready_url = f"http://127.0.0.1:{port}{ready_path}"
        self.phases, self.large, self.cwd = phases, large, cwd
        self.proc: subprocess.Popen | None = None
        self.cold_start_s = 0.0
        self.runs: list[dict] = []
        self.large_runs: list[dict] = []

    def start(self, work: Path) -> None:
        self.proc, self.cold_start_s = _start(self.cmd, self.env, self.ready_url, work / f"{self.name}.log",
                                              timeout_s=300, cwd=self.cwd)
        # Several workers answer /readyz in turn: wait until a run of fresh connections all say ready.
        for _ in range(200):
            if all(_get_ok(self.ready_url) for _ in range(10)):
                break
            time.sleep(0.05)
        print(f"{self.name}: ready in {self.cold_start_s:.2f}s", flush=True)

    def summary(self) -> dict:
        assert self.proc is not None
        out = {"cold_start_s": round(self.cold_start_s, 2), "phases": median_phases(self.runs),
               **tree_rss_mb(self.proc.pid)}
        if self.large_runs:
            out["large"] = median_phases(self.large_runs)
        return out


def float32_twin(shipped: Path, out: Path, settings) -> Path:
    """The shipped bundle's model exported as float32 (what HemaFlow shipped before MODEL_QUANTIZATION)
    from the run's registered Keras weights, with the same metadata, canaries and detector, signed
    with this stack's key. `hemaflow-before` and `flask` serve it: today's app with today's model.
    A bundle that is already float32 is returned as it is."""
    import json

    import mlflow
    import numpy as np
    from PIL import Image

    from contracts.bundle import BUNDLE_JSON, QUANTIZATION_NONE, quantization_of
    from contracts.ood import OOD_FILE, OodDetector
    from training.bundle import export_bundle
    from training.tracking import MODEL_ARTIFACT

    meta = json.loads((shipped / BUNDLE_JSON).read_text())
    if quantization_of(meta) == QUANTIZATION_NONE:
        return shipped
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = mlflow.tensorflow.load_model(f"runs:/{meta['run_id']}/{MODEL_ARTIFACT}")
    canaries = meta["canaries"]
    images = np.stack([np.asarray(Image.open(shipped / c["file"]).convert("RGB")) for c in canaries])
    ood = None
    if meta.get("ood"):
        detector = OodDetector.load(meta["ood"], (shipped / OOD_FILE).read_bytes())
        ood = (detector, meta["ood"]["validation"])
    export_bundle(model, out, dataset=meta["dataset"], dataset_version=meta["dataset_version"],
                  labels=meta["labels"], classes=meta["classes"], image_size=meta["image_size"],
                  canary_images=images, canary_labels=[c["label"] for c in canaries],
                  positive_label=meta["positive_label"], threshold=meta["threshold"], metrics=meta["metrics"],
                  run_id=meta["run_id"], model_name=meta["model_name"], git_commit=meta["git_commit"],
                  signing_key=settings.bundle_signing_key.get_secret_value(),
                  crop=meta["preprocessing"].get("crop", "center_crop"), calibration=meta["calibration"], ood=ood)
    return out
