"""The processed-dataset format: the contract between `preprocess` and `training`.

A processed dataset version lives under `processed/<dataset>/<dataset_version>/` in S3:

    train-00000-of-00002.tfrecord ...   TFRecord shards, one tf.train.Example per image
    val-00000-of-00001.tfrecord ...
    test-00000-of-00001.tfrecord ...
    manifest.jsonl                       one row per image (key, sha256, class, label, split, ...)
    dataset.json                         DatasetMeta; written LAST, so its presence means complete

Shards written since issue 14 are stored once per content under `processed/<dataset>/_shards/`
(pipeline/incremental.py) and `DatasetMeta.shard_objects` maps each shard name to its S3 key;
readers go through `DatasetMeta.object_key`, which falls back to `<version prefix>/<name>` for
versions written before (no `shard_objects`). Locally a version is still one folder of files
named as in `shards`.

Each Example has: `image` (raw uint8 bytes, IMAGE_SIZE x IMAGE_SIZE x 3, row-major RGB),
`label` (int64 index into `labels`), `sha256` (bytes), `height`, `width` (int64).
Raw pixels rather than JPEG keep decoding out of the training loop on a 2-core CPU.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.settings import Settings

SPLITS = ("train", "val", "test")
META_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
FORMAT_VERSION = 1


@dataclass
class DatasetMeta:
    dataset: str
    dataset_version: str
    image_size: int
    labels: list[str]  # model output order
    classes: dict[str, str]  # class folder -> label
    positive_label: str | None
    counts: dict[str, dict[str, int]]  # split -> label -> images
    shards: dict[str, list[str]]  # split -> shard file names (relative to the version prefix)
    preprocessing: dict[str, Any]
    source_manifest_key: str = ""
    validation_summary_key: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    shard_objects: dict[str, str] = field(default_factory=dict)  # shard name -> S3 key of its bytes

    def object_key(self, name: str) -> str:
        """S3 key of a file of this version: a shared shard object, else under the version prefix."""
        return self.shard_objects.get(name) or version_prefix(self.dataset, self.dataset_version) + name

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetMeta":
        raw = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


def version_prefix(dataset: str, dataset_version: str) -> str:
    return f"processed/{dataset}/{dataset_version}/"


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, *parts) -> list:
    """A length-delimited protobuf field (wire type 2) as a list of buffers (joined once, at the end)."""
    flat = [p for part in parts for p in (part if isinstance(part, list) else [part])]
    size = sum(len(p) for p in flat)
    return [_varint((number << 3) | 2) + _varint(size), *flat]


def _bytes_feature(value) -> list:
    return _field(1, _field(1, value))  # Feature.bytes_list -> BytesList.value


def _int64_feature(value: int) -> list:
    if value < 0:
        raise ValueError("only non-negative int64 features are written")
    return _field(3, _field(1, _varint(value)))  # Feature.int64_list -> packed Int64List.value


def encode_example(image, label: int, sha256: str) -> bytes:
    """Serialize one image (uint8 HxWx3 array) as a tf.train.Example.

    The protobuf wire format is written directly (Example > Features > map<string, Feature>),
    so the data pipeline never imports TensorFlow, and the pixels are copied once;
    tests parse the result with TensorFlow.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    pixels = memoryview(np.ascontiguousarray(image, dtype=np.uint8)).cast("B")
    features = {
        "image": _bytes_feature(pixels),
        "label": _int64_feature(int(label)),
        "sha256": _bytes_feature(sha256.encode()),
        "height": _int64_feature(height),
        "width": _int64_feature(width),
    }
    entries = [_field(1, _field(1, k.encode()), _field(2, v)) for k, v in sorted(features.items())]
    return b"".join(_field(1, *entries))


def _masked_crc(data: bytes) -> bytes:
    import crc32c  # lazy: only the TFRecord writer needs it; serving's image has no crc32c

    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord_header(record: bytes) -> bytes:
    """The 12 bytes before a TFRecord's data: uint64 length and the masked CRC32C of the length."""
    length = struct.pack("<Q", len(record))
    return length + _masked_crc(length)


def tfrecord_frame(record: bytes) -> bytes:
    """One TFRecord: header, data, masked CRC32C of the data."""
    return tfrecord_header(record) + record + _masked_crc(record)


class TFRecordWriter:
    """Minimal uncompressed TFRecord file writer (what `tf.io.TFRecordWriter` writes)."""

    def __init__(self, path: Path | str) -> None:
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()/__exit__

    def write(self, record: bytes) -> None:
        self._fh.write(tfrecord_header(record))
        self._fh.write(record)
        self._fh.write(_masked_crc(record))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def feature_spec():
    """The parsing spec for `tf.io.parse_single_example` / `parse_example`."""
    import tensorflow as tf  # lazy: contracts imports without TensorFlow (serving, DAG parsing)

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "sha256": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
    }


def local_version_dir(settings: Settings, dataset: str, dataset_version: str) -> Path:
    return settings.hemaflow_home / "cache" / "processed" / dataset / dataset_version


def read_local_meta(folder: Path) -> DatasetMeta:
    return DatasetMeta.from_json((folder / META_FILE).read_text(encoding="utf-8"))


def read_local_manifest(folder: Path) -> list[dict[str, Any]]:
    with open(folder / MANIFEST_FILE, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
