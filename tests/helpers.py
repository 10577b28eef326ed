"""Helpers the test modules import (conftest files hold only fixtures and hooks)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HEMAFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """The real dataset folder, or skip with a clear reason when ../shared/data is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set HEMAFLOW_SHARED_DATA or add ../shared/data)")
    return path


@contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` applied, restored afterwards (in-process MLflow clients read it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def restain(images, hue_degrees: float, saturation: float):
    """A different stain batch (drift tests): uint8 RGB [N,H,W,3] with hue rotated and saturation
    scaled in HSV."""
    import numpy as np
    from PIL import Image

    out = []
    for image in images:
        hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + round(hue_degrees / 360 * 256)) % 256
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        out.append(np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")))
    return np.stack(out)
