"""The TensorFlow-free TFRecord writer produces exactly what TensorFlow reads."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.processed import TFRecordWriter, encode_example, feature_spec


@pytest.mark.slow  # imports TensorFlow (several seconds)
def test_records_parse_with_tensorflow(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    labels = [0, 1, 300]  # 300: a multi-byte varint
    path = tmp_path / "x.tfrecord"
    with TFRecordWriter(path) as writer:
        for i, (img, label) in enumerate(zip(images, labels)):
            writer.write(encode_example(img, label, f"{i:064x}"))

    records = list(tf.data.TFRecordDataset([str(path)]))  # verifies the CRCs, fails on a bad frame
    assert len(records) == 3
    for record, img, label, i in zip(records, images, labels, range(3)):
        ex = tf.io.parse_single_example(record, feature_spec())
        assert np.array_equal(np.frombuffer(ex["image"].numpy(), np.uint8).reshape(8, 8, 3), img)
        assert int(ex["label"]) == label and int(ex["height"]) == 8 and int(ex["width"]) == 8
        assert ex["sha256"].numpy().decode() == f"{i:064x}"
        expected = tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            "sha256": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"{i:064x}".encode()])),
            "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[8])),
            "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[8])),
        }))
        assert tf.train.Example.FromString(record.numpy()) == expected

    # A corrupted byte is detected by TensorFlow's CRC check.
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset([str(path)]))
