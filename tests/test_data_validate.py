"""validate_case: every bad input raises CrlnError naming the source and what was found."""

from __future__ import annotations

import numpy as np
import pytest

from crln.data import Case, validate_case
from crln.errors import CrlnError


def _case(image=None, label=None, source="/data/x/case7.h5") -> Case:
    image = np.zeros((6, 5, 4), np.float32) if image is None else image
    return Case("case7", image, label, source=source)


def test_valid_case_casts_label() -> None:
    label = np.zeros((6, 5, 4), np.int64)
    label[1:4, 2:5, :2] = 1
    out = validate_case(_case(label=label), num_classes=2, require_label=True)
    assert out.case_id == "case7" and out.image.shape == (6, 5, 4)
    assert out.label.dtype == np.uint8 and out.label.shape == (6, 5, 4)
    np.testing.assert_array_equal(out.label, label)  # the cast keeps every class index
    # a constant image is allowed, and returned as it is (no label: none is made up)
    constant = np.full((6, 5, 4), 3.0, np.float32)
    out = validate_case(_case(image=constant))
    np.testing.assert_array_equal(out.image, constant)
    assert out.label is None


def test_nan_inf() -> None:
    image = np.zeros((6, 5, 4), np.float32)
    image[0, 0, :2] = np.nan
    image[1, 1, 1] = np.inf
    with pytest.raises(CrlnError, match=r"case7\.h5: image has 2 NaN and 1 Inf voxels"):
        validate_case(_case(image=image))


@pytest.mark.parametrize("shape", [(6, 5), (2, 6, 5, 4), (1, 2, 6, 5, 4)])
def test_ndim(shape) -> None:
    with pytest.raises(CrlnError, match=r"case7\.h5: image has shape .* expected 3D"):
        validate_case(_case(image=np.zeros(shape, np.float32)))


def test_channels_allowed() -> None:
    image = np.random.default_rng(0).normal(size=(2, 6, 5, 4)).astype(np.float32)
    label = np.zeros((6, 5, 4), np.int32)
    label[2, 2, 2] = 1
    # the label matches the image's spatial shape (the last three axes), not its channel axis
    out = validate_case(_case(image=image, label=label), allow_channels=True, num_classes=2)
    np.testing.assert_array_equal(out.image, image)
    assert out.label.dtype == np.uint8
    np.testing.assert_array_equal(out.label, label)


def test_label_required() -> None:
    with pytest.raises(CrlnError, match=r"case7\.h5: label is missing"):
        validate_case(_case(), require_label=True)


def test_label_out_of_range() -> None:
    label = np.zeros((6, 5, 4), np.int32)
    label[0, 0, 0], label[1, 0, 0] = 2, 5
    with pytest.raises(CrlnError, match=r"case7\.h5: label values \[2, 5\] outside .*\[0, 1\]"):
        validate_case(_case(label=label), num_classes=2)
    label[2, 0, 0] = -1
    with pytest.raises(CrlnError, match=r"label values \[-1, 2, 5\]"):
        validate_case(_case(label=label), num_classes=2)
    with pytest.raises(CrlnError, match=r"label values \[-1\] outside .*\[0, 255\]"):
        validate_case(_case(label=label))


def test_label_shape_mismatch() -> None:
    with pytest.raises(CrlnError, match=r"case7\.h5: label shape \(6, 5, 3\) differs"):
        validate_case(_case(label=np.zeros((6, 5, 3), np.uint8)))


def test_label_non_integer() -> None:
    with pytest.raises(CrlnError, match="non-integer"):
        validate_case(_case(label=np.full((6, 5, 4), 0.5)))


def test_names_case_id_without_source() -> None:
    with pytest.raises(CrlnError, match="case 'case7'"):
        validate_case(_case(image=np.zeros((3, 3), np.float32), source=""))
