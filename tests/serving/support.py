"""Helpers the serving tests import: bundle forging, image bytes, a serving subprocess, a TCP proxy."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ops.supervisor import free_port
from tests.helpers import REPO_ROOT
from tests.fixtures.keys import PUBLIC_KEY, SIGNING_KEY

START_TIMEOUT_S = 60.0


def resum(folder: Path, signing_key: str | None = SIGNING_KEY) -> None:
    """Rewrite SHA256SUMS after a test edited a bundle on purpose, and sign it with `signing_key`
    (None: keep the old, now stale, signature file)."""
    from training.bundle import sign_bundle

    lines = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in ("SHA256SUMS", "SHA256SUMS.sig"):
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    if signing_key is not None:
        sign_bundle(folder, signing_key)


def forge(source: Path, target: Path, signing_key: str | None, **meta_changes) -> Path:
    """A copy of `source` with bundle.json edited, checksums recomputed (self-consistent, as a forger
    with MLflow write access would make it), then signed with `signing_key` (None: keep the stale
    signature; "" : no signature file at all)."""
    shutil.copytree(source, target)
    meta = json.loads((target / "bundle.json").read_text())
    meta.update(meta_changes)
    (target / "bundle.json").write_text(json.dumps(meta))
    if signing_key == "":
        (target / "SHA256SUMS.sig").unlink()
    resum(target, signing_key or None)  # None / "": the copied signature stays stale, or is gone
    return target


def point_link(link: Path, target: Path) -> None:
    """Atomically repoint a symlink (how a deploy swaps the bundle folder)."""
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


class ServingProcess:
    """A `python -m serving` subprocess on a free port."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "serving.log"
        self.env = {
            **os.environ,
            "BUNDLE_TRUSTED_PUBLIC_KEYS": PUBLIC_KEY,  # a test pins other keys through `env`
            "HEMAFLOW_ENV_FILE": "",
            "HEMAFLOW_SECRETS_FILE": "",
            "PYTHONPATH": str(REPO_ROOT),
            "TMPDIR": str(self.tmpdir),  # the privacy test checks nothing lands here
            "SERVING_PORT": str(self.port),
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> ServingProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "--port", str(self.port)],
            cwd=str(REPO_ROOT), env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serving exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"serving not {'ready' if wait_ready else 'live'} after {START_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (96, 80), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16)
        img = Image.fromarray(arr)
    else:
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


class TcpProxy:
    """A loopback TCP forwarder: stopping it makes the upstream (MLflow) unreachable for real."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._running:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._running = False
        self.sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
