"""Ed25519 signatures of SHA256SUMS: who may publish a servable bundle (contracts.signing)."""

from __future__ import annotations

import base64
import json

import pytest

from contracts.settings import Settings
from contracts.bundle import SIGNATURE_FILE, SUMS_FILE, BundleError, verify_signature
from contracts.signing import (
    SignatureRejected,
    generate_key_pair,
    key_id,
    load_private_key,
    parse_public_keys,
    public_key_of,
    sign_sums,
    verify_sums,
)

SUMS = b"0" * 64 + b"  model.tflite\n" + b"1" * 64 + b"  bundle.json\n"


def _reason(sums: bytes, sig: bytes | None, trusted: str) -> str:
    with pytest.raises(SignatureRejected) as err:
        verify_sums(sums, sig, parse_public_keys(trusted))
    return err.value.reason


def test_round_trip_names_the_signing_key():
    private, public = generate_key_pair()
    assert public_key_of(private) == public
    trusted = parse_public_keys(public)
    kid = verify_sums(SUMS, sign_sums(SUMS, private), trusted)
    assert kid == key_id(load_private_key(private).public_key()) and list(trusted) == [kid]


def test_missing_wrong_and_unknown_signatures_have_distinct_reasons():
    private, public = generate_key_pair()
    forger, _ = generate_key_pair()
    assert _reason(SUMS, None, public) == "unsigned"
    # Checksums changed after signing (a self-consistent forgery that kept the genuine signature).
    assert _reason(SUMS.replace(b"0" * 64, b"2" * 64), sign_sums(SUMS, private), public) == "bad_signature"
    # Signed by a key serving does not pin.
    assert _reason(SUMS, sign_sums(SUMS, forger), public) == "unknown_key"
    # Claims a trusted key id but was signed by another key.
    doc = json.loads(sign_sums(SUMS, forger))
    doc["key_id"] = json.loads(sign_sums(SUMS, private))["key_id"]
    assert _reason(SUMS, json.dumps(doc).encode(), public) == "bad_signature"
    # Garbage, wrong algorithm, oversized.
    assert _reason(SUMS, b"not json", public) == "bad_signature"
    doc = json.loads(sign_sums(SUMS, private))
    assert _reason(SUMS, json.dumps({**doc, "algorithm": "rsa"}).encode(), public) == "bad_signature"
    assert _reason(SUMS, b" " * 10_000, public) == "bad_signature"
    # No pinned key at all: nothing is trusted.
    assert _reason(SUMS, sign_sums(SUMS, private), "") == "unknown_key"


def test_signature_is_domain_separated():
    """A raw Ed25519 signature of the checksum bytes (no HemaFlow prefix) does not verify."""
    private, public = generate_key_pair()
    raw = load_private_key(private).sign(SUMS)
    doc = json.loads(sign_sums(SUMS, private))
    doc["signature"] = base64.b64encode(raw).decode()
    assert _reason(SUMS, json.dumps(doc).encode(), public) == "bad_signature"


def test_rotation_trusts_every_pinned_key_and_only_those():
    old_private, old_public = generate_key_pair()
    new_private, new_public = generate_key_pair()
    both = parse_public_keys(f"{old_public}, {new_public}")
    assert verify_sums(SUMS, sign_sums(SUMS, old_private), both) != verify_sums(SUMS, sign_sums(SUMS, new_private), both)
    # After the old key is dropped, bundles it signed are refused.
    assert _reason(SUMS, sign_sums(SUMS, old_private), new_public) == "unknown_key"


def test_bundle_signature_is_checked_before_anything_else():
    private, public = generate_key_pair()
    files = {SUMS_FILE: SUMS, "model.tflite": b"not even the listed bytes"}
    with pytest.raises(BundleError) as err:
        verify_signature(files, parse_public_keys(public))
    assert err.value.reason == "unsigned"
    files[SIGNATURE_FILE] = sign_sums(SUMS, private)
    assert verify_signature(files, parse_public_keys(public))


@pytest.mark.parametrize("bad", ["not-base64!", base64.b64encode(b"short").decode(), "QUFB"])
def test_malformed_keys_are_start_up_errors(bad):
    with pytest.raises(ValueError):
        parse_public_keys(bad)
    with pytest.raises(ValueError, match="BUNDLE_TRUSTED_PUBLIC_KEYS"):
        Settings(bundle_trusted_public_keys=f"{generate_key_pair()[1]},{bad}")
    with pytest.raises(ValueError):
        load_private_key(bad)


def test_signing_key_is_secret_in_settings():
    private, public = generate_key_pair()
    s = Settings(bundle_signing_key=private, bundle_trusted_public_keys=public)
    assert private not in repr(s) and private not in str(s.model_dump())
