"""Read uploaded files into memory with hard size limits, never onto disk.

Starlette's form parser spools files over 1 MB to a temporary file; images must stay in
memory, so the request body is streamed through python-multipart here instead. Limits are
enforced while reading (Content-Length first, then every chunk), so an oversized upload
is refused with 413 after at most `limit` bytes, whatever the client claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file bytes
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")


class UploadError(Exception):
    """A request that cannot be read; maps to an HTTP status and a JSON error."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass
class UploadedFile:
    field: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _PartState:
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[str, bytes] = field(default_factory=dict)
    current: UploadedFile | None = None


async def read_files(request: Request, *, max_file_bytes: int, max_files: int, field_name: str = "file") -> list[UploadedFile]:
    """The uploaded files of a multipart request (field `field_name`), or a raw image body."""
    ctype_header = request.headers.get("content-type", "")
    ctype, params = parse_options_header(ctype_header)
    ctype_s = ctype.decode("latin-1").lower() if isinstance(ctype, bytes) else str(ctype).lower()
    total_limit = max_file_bytes * max_files + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise UploadError(400, "bad_request", "Content-Length is not a number") from None
        if declared_n > total_limit:
            raise UploadError(413, "too_large", f"request body of {declared_n} bytes exceeds the limit of {max_file_bytes} bytes per file")

    if ctype_s.startswith(RAW_IMAGE_TYPES):
        upload = UploadedFile(field_name, None, ctype_s)
        async for chunk in _chunks(request):
            upload.data += chunk
            if len(upload.data) > max_file_bytes:
                raise UploadError(413, "too_large", f"the file exceeds the limit of {max_file_bytes} bytes")
        return [upload]
    if ctype_s != "multipart/form-data":
        raise UploadError(
            415, "unsupported_media_type",
            "send multipart/form-data with the image in the field 'file' (or a raw image/* body)",
        )
    boundary = params.get(b"boundary") if isinstance(next(iter(params), b""), bytes) else params.get("boundary")
    if not boundary:
        raise UploadError(400, "bad_request", "multipart request without a boundary")
    if isinstance(boundary, str):
        boundary = boundary.encode("latin-1")

    files: list[UploadedFile] = []
    state = _PartState()

    def on_part_begin() -> None:
        state.headers = {}
        state.current = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[bytes(state.header_field).decode("latin-1").lower()] = bytes(state.header_value)
        state.header_field.clear()
        state.header_value.clear()

    def on_headers_finished() -> None:
        disp, disp_params = parse_options_header(state.headers.get("content-disposition", b""))
        name = _param(disp_params, "name")
        filename = _param(disp_params, "filename")
        if name != field_name:
            state.current = None  # other form fields are ignored
            return
        if len(files) >= max_files:
            raise UploadError(413, "too_many_files", f"at most {max_files} files per request")
        ctype_part = state.headers.get("content-type", b"").decode("latin-1") or None
        state.current = UploadedFile(name, filename, ctype_part)
        files.append(state.current)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        cur = state.current
        if cur is None:
            return
        cur.data += data[start:end]
        if len(cur.data) > max_file_bytes:
            raise UploadError(413, "too_large", f"{cur.filename or 'the file'} exceeds the limit of {max_file_bytes} bytes")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    received = 0
    try:
        async for chunk in _chunks(request):
            received += len(chunk)
            if received > total_limit:
                raise UploadError(413, "too_large", f"request body exceeds the limit of {max_file_bytes} bytes per file")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as exc:  # malformed multipart
        raise UploadError(400, "bad_multipart", f"the multipart body cannot be parsed: {exc}") from None
    if not files:
        raise UploadError(422, "missing_file", f"no file in the multipart field '{field_name}'")
    return files


async def _chunks(request: Request):
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise UploadError(400, "client_disconnected", "the client closed the connection during the upload") from None


def _param(params: dict, key: str) -> str | None:
    value = params.get(key.encode()) if params and isinstance(next(iter(params)), bytes) else params.get(key)
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
