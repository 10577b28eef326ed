"""Helpers for the tests that run Airflow as deployed (see ops.airflow_local).

The HemaFlow side of the deployment is configured the way a user does it: `.env.example`
copied verbatim to `.env` (HEMAFLOW_ENV_FILE), plus the environment of the private test
stack (endpoints, random credentials) and a tiny, fast training configuration.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from contracts.settings import PROJECT_ROOT
from tests.fixtures.data import bad_images, encode, make_image, make_image_tree

NEW_SPEC = "wbc4"  # what `cp pipeline/specs/_template.toml pipeline/specs/wbc4.toml` creates
TEMPLATE_SPEC = PROJECT_ROOT / "pipeline" / "specs" / "_template.toml"
IMAGES_PER_CLASS = 70  # 4 classes x 70 = 280: enough that the old code spawned its process pool
# Tiny and fast: 32 px images and network, two narrow blocks, one epoch; floors at zero so the
# first candidate becomes @champion.
FAST_TRAINING_ENV = {
    "IMAGE_SIZE": "32",
    "TRAIN_INPUT_SIZE": "32",
    "EPOCHS": "1",
    "BATCH_SIZE": "32",
    "MODEL_WIDTH": "8",
    "MODEL_DEPTH": "2",
    "CANARY_COUNT": "2",
    "SHARD_SIZE": "128",
    "TRAIN_TIME_BUDGET_S": "300",
    "GATE_MIN_BALANCED_ACCURACY": "0",
    "GATE_MIN_SENSITIVITY": "0",
    "GATE_MIN_ACCURACY": "0",
    "GATE_MARGIN": "0",
    "TRANSFER_WORKERS": "4",
}


def copy_env_example(folder: Path) -> Path:
    """`.env.example` copied verbatim to `<folder>/.env`, as the README tells users to."""
    dotenv = folder / ".env"
    dotenv.write_bytes((PROJECT_ROOT / ".env.example").read_bytes())
    return dotenv


def cron_at(moment: datetime) -> str:
    """A daily cron expression that fires at `moment` (UTC, minute precision)."""
    return f"{moment.minute} {moment.hour} * * *"


def next_minute_after(seconds: float) -> datetime:
    moment = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return (moment + timedelta(minutes=1)).replace(second=0, microsecond=0)


def image_tree(root: Path, shared_pbc8: Path | None, part: int = 0) -> tuple[Path, str]:
    """Folder-per-class images of the template's four classes, all needing a resize:
    pbc8 crops (360x363) when ../shared/data is there, else generated 320x240 JPEGs.
    Each `part` is IMAGES_PER_CLASS other images per class (a batch unlike the training upload)."""
    classes = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
    if shared_pbc8 is not None and shared_pbc8.is_dir():
        for folder in classes:
            (root / folder).mkdir(parents=True, exist_ok=True)
            for path in sorted((shared_pbc8 / folder).iterdir())[part * IMAGES_PER_CLASS:][:IMAGES_PER_CLASS]:
                shutil.copyfile(path, root / folder / path.name)
        return root, "pbc8 360x363 JPEGs"
    make_image_tree(root, {c: IMAGES_PER_CLASS for c in classes}, size=(320, 240), seed=part, fmt="JPEG")
    return root, "generated 320x240 JPEGs"


# Sizes beside the class images' own (all need resizing): non-square both ways, the smallest sides
# validation accepts (MIN_IMAGE_SIDE 32), and large photographs (one of 35 Mpx, under MAX_IMAGE_PIXELS).
ACCEPTED_SIZES = {"portrait.jpg": (240, 400), "wide.jpg": (960, 240), "smallest.png": (40, 32),
                  "large.jpg": (4000, 3000)}
HUGE = ("huge.jpg", (7000, 5000))


def every_accepted_shape(tree: Path) -> list[str]:
    """Beside each class folder's images, its first image again in every mode, format and size the
    validation accepts (16-bit and 8-bit grey, CMYK, RGBA, palette with transparency, TIFF, BMP,
    non-square, smallest, large); returns the added paths relative to `tree`."""
    import numpy as np
    from PIL import Image

    added: list[str] = []
    for index, folder in enumerate(sorted(p for p in tree.iterdir() if p.is_dir())):
        with Image.open(sorted(folder.iterdir())[0]) as first:
            rgb = first.convert("RGB")
        alpha = Image.linear_gradient("L").resize(rgb.size).point(lambda v: 128 + v // 2)
        variants = {
            "grey16.png": encode(Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257), "PNG"),
            "grey8.jpg": encode(rgb.convert("L"), "JPEG", quality=90),
            "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=90),
            "rgba.png": encode(Image.merge("RGBA", (*rgb.split(), alpha)), "PNG"),
            "palette_alpha.png": encode(rgb.quantize(64), "PNG", transparency=0),
            "rgb.tif": encode(rgb, "TIFF"),
            "rgb.bmp": encode(rgb, "BMP"),
            **{name: encode(rgb.resize(size), "JPEG" if name.endswith(".jpg") else "PNG")
               for name, size in ACCEPTED_SIZES.items()},
        }
        if index == 0:
            variants[HUGE[0]] = encode(rgb.resize(HUGE[1]), "JPEG", quality=85)
        for name, data in variants.items():
            (folder / f"shape_{name}").write_bytes(data)
            added.append(f"{folder.name}/shape_{name}")
    return added


def add_bad_files(folder: Path) -> dict[str, str]:
    """Files validation must quarantine (empty, truncated, not an image, decompression bombs, a side
    under MIN_IMAGE_SIDE) in `folder`; returns file name -> expected quarantine reason."""
    bad = {**bad_images(), "tiny.png": (encode(make_image(3, (180, 90, 120), (16, 16)), "PNG"), "bad_dimensions")}
    for name, (data, _) in bad.items():
        (folder / f"bad_{name}").write_bytes(data)
    return {f"bad_{name}": reason for name, (_, reason) in bad.items()}


def upload_cli(tree: Path, dataset: str, env: dict[str, str]) -> str:
    """`python -m pipeline upload TREE --dataset D` as a user runs it; returns its output."""
    done = subprocess.run([sys.executable, "-m", "pipeline", "upload", str(tree), "--dataset", dataset],
                          env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def serving_model_version(url: str) -> str | None:
    try:
        r = httpx.get(f"{url}/readyz", timeout=2.0)
    except httpx.HTTPError:
        return None
    return r.json().get("model_version") if r.status_code == 200 else None


def task_table(tis: list[dict]) -> str:
    """One line per task: state, duration, attempt, worker (for the test log and the notes)."""
    rows = sorted(tis, key=lambda t: t.get("start_date") or "")
    return "\n".join(f"  {t['task_id']:15s} {str(t.get('state')):10s} {t.get('duration') or 0:7.1f}s "
                     f"try {t.get('try_number')} on {t.get('hostname')}" for t in rows)


def run_wall_s(run: dict) -> float:
    start = datetime.fromisoformat(run["start_date"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(run["end_date"].replace("Z", "+00:00"))
    return (end - start).total_seconds()
