"""The dataset-format registry (crln.data_formats): one table for detection, config checks and predict."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from crln.config import load_config
from crln.data.compact import CompactDataset, compact_h5_dataset
from crln.data.h5 import H5Dataset, read_h5_case
from crln.data.nifti import NiftiDataset, read_nifti_volume
from crln.data.phantom import write_phantom_h5_dataset, write_phantom_nifti_dataset
from crln.data.sources import open_dataset_root
from crln.data_formats import DATA_FORMAT_VALUES, FORMATS, SCAN_ENDINGS, read_scan, scan_format, select_format
from crln.errors import CrlnError

SHAPE = (32, 32, 16)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small folder of each format: h5, its compact copy, NIfTI (two channels)."""
    base = tmp_path_factory.mktemp("formats")
    h5 = write_phantom_h5_dataset(base / "h5", n_train=2, n_test=1, shape=SHAPE)
    compact_h5_dataset(h5, base / "compact")
    nifti = write_phantom_nifti_dataset(base / "nifti", n_train=2, n_test=1, shape=SHAPE, channels=2)
    return {"h5": h5, "compact": base / "compact", "nifti": nifti}


def test_every_format_module_has_the_hooks_its_line_promises() -> None:
    assert len({f.name for f in FORMATS}) == len(FORMATS)
    for fmt in FORMATS:
        module = importlib.import_module(fmt.module)
        assert callable(module.detect_root) and callable(module.open_root), fmt.name
        assert callable(getattr(module, "read_scan", None)) == bool(fmt.scan_endings), fmt.name
    assert DATA_FORMAT_VALUES == ("h5", "nifti")
    assert SCAN_ENDINGS == (".nii.gz", ".nii", ".h5", ".hdf5")


@pytest.mark.parametrize(
    ("folder", "fmt", "expected"),
    [
        ("h5", "auto", "h5"),
        ("compact", "auto", "compact"),
        ("nifti", "auto", "nifti"),
        ("h5", "h5", "h5"),
        ("compact", "h5", "compact"),  # the same config trains on an h5 folder or its compact copy
        ("nifti", "nifti", "nifti"),
        ("h5", "nifti", "nifti"),  # the config decides; NiftiDataset then names what is missing
    ],
)
def test_detection_order_and_config_value(roots: dict[str, Path], folder: str, fmt: str, expected: str) -> None:
    assert select_format(roots[folder], fmt).name == expected


def test_open_dataset_root_opens_each_format_with_its_reader(roots: dict[str, Path]) -> None:
    kinds = {"h5": H5Dataset, "compact": CompactDataset, "nifti": NiftiDataset}
    for folder, kind in kinds.items():
        dataset = open_dataset_root(roots[folder])
        assert isinstance(dataset, kind) and len(dataset.ids("train")) == 2
    with pytest.raises(CrlnError, match="no imagesTr/ or imagesTs/ folder"):
        open_dataset_root(roots["h5"], "nifti")


def test_unknown_format_is_a_user_error_naming_the_values(roots: dict[str, Path]) -> None:
    with pytest.raises(CrlnError, match=r"dataset format 'dicom': expected 'h5' or 'nifti'"):
        open_dataset_root(roots["h5"], "dicom")
    with pytest.raises(CrlnError, match=r"config key data\.format: expected 'h5' or 'nifti', got 'dicom'"):
        load_config("demo", ["data.format=dicom"])


def test_read_scan_reads_h5_files_and_nifti_channel_files(roots: dict[str, Path]) -> None:
    h5_file = roots["h5"] / "data" / "case_000.h5"
    case = read_scan([h5_file], "case_000")
    expected = read_h5_case(h5_file, "case_000", with_label=False)
    assert case.label is None and case.case_id == "case_000" and np.array_equal(case.image, expected.image)

    channels = [roots["nifti"] / "imagesTr" / f"case_000_000{k}.nii.gz" for k in (0, 1)]
    case = read_scan(channels, "case_000")
    assert case.image.shape == (2, *SHAPE) and case.case_id == "case_000"
    assert np.array_equal(case.image, read_nifti_volume(channels).image)


def test_scan_of_no_format_is_a_user_error(tmp_path: Path) -> None:
    assert scan_format(tmp_path / "scan.nii.gz").name == "nifti" and scan_format(tmp_path / "x.hdf5").name == "h5"
    assert scan_format(tmp_path / "scan.mha") is None
    with pytest.raises(CrlnError, match=r"scan\.mha: expected a \.nii\.gz, \.nii, \.h5 or \.hdf5 file"):
        read_scan([tmp_path / "scan.mha"], "scan")
