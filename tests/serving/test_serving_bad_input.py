"""Every kind of bad upload gets a clear 4xx JSON error; nothing is written or logged; no 5xx."""

from __future__ import annotations

import io
import select
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.support import image_bytes

pytestmark = pytest.mark.slow

LIMIT = 2_000_000  # SERVING_MAX_UPLOAD_BYTES of local_bundle_server


def _post(server, data: bytes, name: str = "x.bin", ctype: str = "application/octet-stream") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/predict", files={"file": (name, data, ctype)}, timeout=30)


def _png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


CASES = {
    "empty": (b"", 422, "empty"),
    "text": (b"hello, this is not an image" * 20, 415, "not_an_image"),
    "truncated_jpeg": (image_bytes("JPEG", size=(300, 300))[:1500], 422, "truncated"),
    "gif": (image_bytes("GIF"), 415, "unsupported_format"),
    "webp": (image_bytes("WEBP"), 415, "unsupported_format"),
    "bomb": (_png_header_bomb(50_000, 50_000), 422, "decompression_bomb"),  # Pillow's own guard
    "bomb_49mp": (_png_header_bomb(7_000, 7_000), 422, "decompression_bomb"),  # MAX_IMAGE_PIXELS setting
    "tiny_8px": (image_bytes("PNG", size=(8, 8)), 422, "bad_dimensions"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_images_get_a_clear_json_error(local_bundle_server, case):
    data, status, code = CASES[case]
    r = _post(local_bundle_server, data)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["detail"]


@pytest.mark.parametrize(
    "fmt,mode",
    [("PNG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "I;16"), ("PNG", "P"), ("TIFF", "RGB"), ("BMP", "RGB")],
)
def test_other_modes_and_formats_are_converted(local_bundle_server, fmt, mode):
    r = _post(local_bundle_server, image_bytes(fmt, mode=mode), f"x.{fmt.lower()}")
    assert r.status_code == 200, r.text
    assert sum(r.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_upload_over_the_limit_is_413(local_bundle_server):
    big = np.random.default_rng(0).integers(0, 255, LIMIT + 10, dtype=np.uint8).tobytes()
    r = _post(local_bundle_server, big, "big.png", "image/png")
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_oversized_stream_without_content_length_is_cut_off(local_bundle_server):
    """A chunked upload that never ends is answered 413 once past the limit (not buffered to the end)."""
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", local_bundle_server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"\0" * 65536
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        while sent < 40 * LIMIT:  # 80 MB if the server kept reading
            try:
                sock.sendall(frame)
            except OSError:
                break
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                break
        sock.settimeout(10)
        try:
            answer = sock.recv(4096)
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Kernel socket buffers (several MB on loopback) absorb some bytes after the server stops reading.
    assert sent < 10 * LIMIT
    assert httpx.get(f"{local_bundle_server.url}/healthz").status_code == 200


def test_wrong_content_type_and_missing_field(local_bundle_server):
    url = f"{local_bundle_server.url}/v1/predict"
    r = httpx.post(url, content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    r = httpx.post(url, files={"picture": ("x.png", image_bytes("PNG"), "image/png")})
    assert r.status_code == 422 and r.json()["error"] == "missing_file"
    r = httpx.post(url, content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500


def test_client_that_disconnects_mid_upload_does_not_hurt_the_server(local_bundle_server):
    host, port = "127.0.0.1", local_bundle_server.port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
        sock.sendall(b"\x89PNG" + b"\0" * 1000)
    assert httpx.get(f"{local_bundle_server.url}/healthz").status_code == 200


def test_images_are_never_written_or_logged_and_no_5xx(local_bundle_server):
    secret_name = "patient-jane-doe-1234.png"
    big_png = io.BytesIO()
    # > 1 MB, the size at which a stock form parser would spool the upload to a temp file.
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big_png, "PNG")
    assert len(big_png.getvalue()) > 1_100_000
    r = _post(local_bundle_server, big_png.getvalue(), secret_name, "image/png")
    assert r.status_code == 200, r.text
    _post(local_bundle_server, b"broken" * 100, secret_name, "image/png")
    assert list(local_bundle_server.tmpdir.iterdir()) == []
    assert secret_name not in local_bundle_server.log()
    metrics = httpx.get(f"{local_bundle_server.url}/metrics").text
    five_xx = [line for line in metrics.splitlines()
               if line.startswith("hemaflow_http_requests_total") and 'status="5' in line]
    assert five_xx == []
    assert local_bundle_server.alive()
