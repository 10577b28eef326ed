"""Ed25519 signatures over a serving bundle's SHA256SUMS (who made the bundle, not just what it holds).

SHA256SUMS proves a bundle is intact; it cannot prove who wrote it: anyone who can write a run
to MLflow can also write matching checksums. Training therefore signs the exact SHA256SUMS
bytes with a private key that only the pipeline holds (`BUNDLE_SIGNING_KEY`), and serving
accepts a bundle only when that signature verifies under one of the public keys pinned in its
own settings (`BUNDLE_TRUSTED_PUBLIC_KEYS`), whatever the registry says. Several trusted keys
make rotation possible: trust the new key, start signing with it, then drop the old one.

Keys travel as base64 of their raw 32 bytes (an Ed25519 private seed, a public key). The
signature file, `SHA256SUMS.sig`, is a small JSON document naming the key that signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
# Domain separation: a signature over a bundle's checksums can never be reused as a signature of
# anything else this key might sign (and vice versa).
SIGNED_PREFIX = b"hemaflow-serving-bundle-sha256sums-v1\n"
KEY_BYTES = 32
MAX_SIGNATURE_FILE_BYTES = 4096


class SignatureRejected(ValueError):
    """A bundle signature that must not be trusted; `reason` is unsigned, bad_signature or unknown_key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key (first 16 hex digits of the sha256 of its raw bytes)."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _decode_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes (base64 of a raw Ed25519 key), got {len(raw)}")
    return raw


def generate_key_pair() -> tuple[str, str]:
    """A new (private, public) key pair as base64 strings."""
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(seed).decode(), base64.b64encode(_raw_public(private.public_key())).decode()


def load_private_key(text: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_decode_key(text, "BUNDLE_SIGNING_KEY"))


def public_key_of(private_text: str) -> str:
    """The base64 public key that belongs to a base64 private key (what serving must trust)."""
    return base64.b64encode(_raw_public(load_private_key(private_text).public_key())).decode()


def parse_public_keys(text: str) -> dict[str, Ed25519PublicKey]:
    """Comma-separated base64 public keys -> {key_id: key}; raises ValueError on a malformed key."""
    keys: dict[str, Ed25519PublicKey] = {}
    for i, item in enumerate(part for part in text.split(",") if part.strip()):
        key = Ed25519PublicKey.from_public_bytes(_decode_key(item, f"trusted public key #{i + 1}"))
        keys[key_id(key)] = key
    return keys


def sign_sums(sums: bytes, private_text: str) -> bytes:
    """The signature file for these exact SHA256SUMS bytes."""
    private = load_private_key(private_text)
    signature = private.sign(SIGNED_PREFIX + sums)
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private.public_key()),
        "signature": base64.b64encode(signature).decode(),
        "signed_file": "SHA256SUMS",
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def verify_sums(sums: bytes, signature_file: bytes | None, trusted: dict[str, Ed25519PublicKey]) -> str:
    """The key id that signed `sums`; raises SignatureRejected when the bundle must be refused."""
    if signature_file is None:
        raise SignatureRejected("unsigned", "the bundle has no SHA256SUMS.sig")
    if len(signature_file) > MAX_SIGNATURE_FILE_BYTES:
        raise SignatureRejected("bad_signature", "SHA256SUMS.sig is too large to be a signature")
    try:
        doc = json.loads(signature_file)
        algorithm, kid = doc["algorithm"], str(doc["key_id"])
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SignatureRejected("bad_signature", "SHA256SUMS.sig is not a HemaFlow signature document") from None
    if algorithm != ALGORITHM:
        raise SignatureRejected("bad_signature", f"unsupported signature algorithm {str(algorithm)[:40]!r}")
    key = trusted.get(kid)
    if key is None:
        pinned = ", ".join(sorted(trusted)) or "none (BUNDLE_TRUSTED_PUBLIC_KEYS is empty)"
        raise SignatureRejected("unknown_key", f"signed by key {kid[:40]!r}, which is not trusted (trusted: {pinned})")
    try:
        key.verify(signature, SIGNED_PREFIX + sums)
    except InvalidSignature:
        raise SignatureRejected("bad_signature", f"the signature does not verify under trusted key {kid}") from None
    return kid
