"""Per-image validation rules and the Great Expectations dataset suite."""

from __future__ import annotations

import pytest

from contracts.settings import get_settings
from pipeline.validate import check_image, failed_expectations, run_gx_suite
from tests.fixtures.data import bad_images, encode, make_image, unusual_images


@pytest.fixture(scope="module")
def settings():
    return get_settings(min_image_side=32, max_image_side=100, min_file_bytes=100, max_file_bytes=50_000,
                        allowed_formats="JPEG,PNG")


def test_a_good_image_passes(settings):
    assert check_image(encode(make_image(1, (200, 80, 90), (64, 64)), "PNG"), settings) == (None, None)


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_files_fail_with_their_reason(settings, name):
    data, reason = bad_images()[name]
    assert check_image(data, settings)[0] == reason


@pytest.mark.parametrize("name", sorted(unusual_images()))
def test_convertible_modes_are_accepted(settings, name):
    assert check_image(unusual_images()[name], settings) == (None, None)


def test_dimension_size_and_format_bounds(settings):
    small = encode(make_image(1, (1, 2, 3), (20, 64)), "PNG")
    assert check_image(small, settings)[0] == "bad_dimensions"
    large = encode(make_image(1, (1, 2, 3), (64, 120)), "JPEG", quality=30)
    assert check_image(large, settings)[0] == "bad_dimensions"
    big_file = encode(make_image(1, (1, 2, 3), (99, 99)), "BMP")
    assert check_image(big_file, settings)[0] == "format_not_allowed"
    assert check_image(big_file, get_settings(allowed_formats="BMP", max_file_bytes=1000))[0] == "file_too_large"
    from PIL import Image

    tiny_file = encode(Image.new("RGB", (40, 40), (9, 9, 9)), "PNG")  # valid but suspiciously small
    assert len(tiny_file) < 1000
    assert check_image(tiny_file, get_settings(min_image_side=32, min_file_bytes=1000))[0] == "file_too_small"


def _rows(counts: dict[str, int]) -> list[dict]:
    return [{"key": f"{lab}/{i}", "sha256": f"{lab}{i}", "label": lab, "class": lab, "bytes": 1000, "width": 64,
             "height": 64} for lab, n in counts.items() for i in range(n)]


@pytest.mark.slow  # imports Great Expectations (several seconds)
def test_gx_suite_passes_a_healthy_dataset_and_names_each_failure():
    s = get_settings(min_images_per_class=5, max_class_imbalance=3.0, min_dataset_rows=10)
    ok = run_gx_suite(_rows({"a": 10, "b": 8}), ["a", "b"], s)
    assert ok["success"] is True and failed_expectations(ok, "error") == []

    rows = _rows({"a": 30, "b": 4})
    rows.append({**rows[0], "key": "a/dup"})  # duplicate sha256
    rows.append({**rows[1], "key": "c/x", "label": "c"})  # label not in the spec
    rows.append({**rows[2], "key": "a/null", "sha256": None})
    bad = run_gx_suite(rows, ["a", "b"], s)
    errors = " | ".join(failed_expectations(bad, "error"))
    assert "expect_column_min_to_be_between" in errors  # b has 4 < 5 images
    assert "expect_column_max_to_be_between" in errors  # 30/4 > 3x imbalance
    assert "expect_column_values_to_be_in_set" in errors and "'c'" in errors
    assert "expect_column_values_to_not_be_null" in errors
    warnings = failed_expectations(bad, "warning")
    assert len(warnings) == 1 and "expect_column_values_to_be_unique" in warnings[0]

    missing = run_gx_suite(_rows({"a": 12}), ["a", "b"], s)
    assert "expect_column_distinct_values_to_equal_set" in " ".join(failed_expectations(missing, "error"))
