"""A minimal S3 client for serving, standard library only (why: boto3 would add ~36 MB to an image
whose installed size is held under 250 MB, for four calls).

It is shaped like the few boto3 calls the review queue makes (`get_object`, `put_object` with
`IfMatch`/`IfNoneMatch`, `head_object`, `list_objects_v2`), returning the same dict keys and raising
`S3Error` with boto3's `.response["Error"]["Code"]`, so contracts.reviews runs unchanged on either.
Requests are path-style and signed with AWS Signature Version 4.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from email.message import Message

from contracts.settings import Settings

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
UNRESERVED = "-_.~"


class S3Error(Exception):
    """An S3 error answer; `.response` has boto3's shape ({"Error": {"Code": ...}, "ResponseMetadata": ...})."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"{code} (HTTP {status}) {message}".strip())
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class S3Lite:
    """Signed S3 requests to the configured endpoint as serving's own identity
    (SERVING_S3_ACCESS_KEY_ID / SERVING_S3_SECRET_ACCESS_KEY, scoped to the review queue's prefixes:
    contracts.screening.serving_s3_actions), one short request per call."""

    def __init__(self, settings: Settings) -> None:
        self.endpoint = settings.s3_endpoint_url.rstrip("/")
        self.host = urllib.parse.urlparse(self.endpoint).netloc
        self.region = settings.s3_region
        self.access_key = settings.serving_s3_access_key_id
        self._secret = settings.serving_s3_secret_access_key
        self.timeout = settings.s3_connect_timeout_s + settings.s3_read_timeout_s

    def _signed_headers(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> dict:
        now = datetime.now(UTC)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(body).hexdigest()
        signed = {**{k.lower(): v.strip() for k, v in headers.items()}, "host": self.host, "x-amz-date": stamp,
                  "x-amz-content-sha256": payload}
        names = ";".join(sorted(signed))
        canonical = "\n".join([method, path, query, "".join(f"{k}:{signed[k]}\n" for k in sorted(signed)), names,
                               payload])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self._secret.get_secret_value()).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = _hmac(key, part)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                                   f"SignedHeaders={names}, Signature={signature}")
        return signed

    def _request(self, method: str, bucket: str, key: str = "", params: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[bytes, Message]:
        """The answer's body and headers (case-insensitive: SeaweedFS sends `Etag`)."""
        path = "/" + urllib.parse.quote(f"{bucket}/{key}" if key else bucket, safe="/" + UNRESERVED)
        query = "&".join(f"{urllib.parse.quote(k, safe=UNRESERVED)}={urllib.parse.quote(v, safe=UNRESERVED)}"
                         for k, v in sorted((params or {}).items()))
        all_headers = self._signed_headers(method, path, query, headers or {}, body)
        all_headers.pop("host")  # urllib sets it (the same value)
        request = urllib.request.Request(f"{self.endpoint}{path}{'?' + query if query else ''}",
                                         data=body if method in ("PUT", "POST") else None,
                                         headers=all_headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:  # noqa: S310 - configured endpoint
                return resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            text = exc.read(20_000)
            code, message = str(exc.code), ""
            try:
                root = ET.fromstring(text)
                code, message = root.findtext("Code") or code, root.findtext("Message") or ""
            except ET.ParseError:
                pass
            raise S3Error(exc.code, code, message) from None

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 - boto3's argument names
        data, headers = self._request("GET", Bucket, Key)
        return {"Body": io.BytesIO(data), "ETag": headers.get("ETag", ""), "ContentLength": len(data)}

    def head_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803
        _, headers = self._request("HEAD", Bucket, Key)
        meta = {k.lower()[len("x-amz-meta-"):]: v for k, v in headers.items() if k.lower().startswith("x-amz-meta-")}
        return {"ETag": headers.get("ETag", ""), "Metadata": meta}

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str | None = None,  # noqa: N803
                   IfMatch: str | None = None, IfNoneMatch: str | None = None) -> dict:
        headers = {"Content-Type": ContentType or "application/octet-stream"}
        headers |= {"If-Match": IfMatch} if IfMatch else {}
        headers |= {"If-None-Match": IfNoneMatch} if IfNoneMatch else {}
        _, answer = self._request("PUT", Bucket, Key, headers=headers, body=bytes(Body))
        return {"ETag": answer.get("ETag", "")}

    def list_objects_v2(self, Bucket: str, Prefix: str = "", Delimiter: str | None = None,  # noqa: N803
                        ContinuationToken: str | None = None, MaxKeys: int | None = None) -> dict:
        params = {"list-type": "2", "prefix": Prefix}
        params |= {"delimiter": Delimiter} if Delimiter else {}
        params |= {"continuation-token": ContinuationToken} if ContinuationToken else {}
        params |= {"max-keys": str(MaxKeys)} if MaxKeys else {}
        root = ET.fromstring(self._request("GET", Bucket, params=params)[0])
        out: dict = {
            "Contents": [{"Key": c.findtext(f"{S3_NS}Key"), "ETag": c.findtext(f"{S3_NS}ETag"),
                          "Size": int(c.findtext(f"{S3_NS}Size") or 0)} for c in root.iter(f"{S3_NS}Contents")],
            "CommonPrefixes": [{"Prefix": p.findtext(f"{S3_NS}Prefix")} for p in root.iter(f"{S3_NS}CommonPrefixes")],
        }
        if (root.findtext(f"{S3_NS}IsTruncated") or "").lower() == "true":
            out["NextContinuationToken"] = root.findtext(f"{S3_NS}NextContinuationToken")
        return out
