"""crln data stats: per-case intensities, checked against numpy on phantoms, and the z-score verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crln.cli import main
from crln.data.sources import open_dataset_root
from crln.data.stats import CaseIntensity, case_intensities, format_intensity_table, spread_sentence


def test_statistics_of_each_case_match_numpy(phantom_root: Path) -> None:
    dataset = open_dataset_root(phantom_root)
    ids = dataset.ids("train")[:3]
    rows = list(case_intensities(dataset, ids))
    for row, case in zip(rows, dataset.load_many(ids), strict=True):
        image, foreground = case.image.astype(np.float64), case.label > 0
        assert row.case == case.case_id and row.shape == case.image.shape
        assert row.mean == pytest.approx(image.mean()) and row.std == pytest.approx(image.std())
        assert row.p99 == pytest.approx(np.percentile(image, 99))
        assert row.foreground_fraction == pytest.approx(foreground.mean())
        contrast = (image[foreground].mean() - image[~foreground].mean()) / image.std()
        assert row.contrast == pytest.approx(contrast)


def _row(case: str, mean: float, std: float) -> CaseIntensity:
    return CaseIntensity(case, (4, 4, 4), mean, std, mean - 2 * std, mean + 2 * std)


def test_table_is_sorted_darkest_first_and_says_whether_cases_are_zscored() -> None:
    rows = [_row("bright", 1.9, 1.6), _row("dark", 0.05, 0.29), _row("middle", 0.8, 0.8)]
    table = format_intensity_table(rows)
    cases = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert cases == ["dark", "middle", "bright"]
    assert "| dark | 4×4×4 | 0.05 | 0.29 |" in table and "| — | — | — | — |" in table  # no label: no contrast
    assert "means 0.05 to 1.9, stds 0.29 to 1.6: the cases are not z-scored" in table
    assert "data.intensity=zscore" in table
    zscored = [_row("a", 0.01, 1.02), _row("b", -0.02, 0.99)]
    assert spread_sentence(zscored).endswith("every case is z-scored already.")


def test_cli_prints_one_line_per_case(phantom_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", str(phantom_root), "--split", "train", "--split", "test"]) == 0
    out = capsys.readouterr().out
    dataset = open_dataset_root(phantom_root)
    n_cases = len(dataset.ids("train")) + len(dataset.ids("test"))
    assert sum(line.startswith("| case_") for line in out.splitlines()) == n_cases
    assert f"{n_cases} cases: means" in out


def test_cli_shows_unlabelled_nifti_training_images_without_contrast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from crln.data.phantom import write_phantom_nifti_dataset

    root = write_phantom_nifti_dataset(tmp_path / "nifti", n_train=3, n_test=1, shape=(12, 12, 8), n_unlabeled=1)
    assert main(["data", "stats", str(root)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| case_")]
    assert len(rows) == 3 and sum(line.endswith("| — | — | — | — |") for line in rows) == 1  # case_002: no label


def test_cli_refuses_an_empty_case_list_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crln.data.phantom import write_phantom_h5_dataset

    root = write_phantom_h5_dataset(tmp_path / "h5", n_train=1, n_test=0, shape=(8, 8, 8))
    assert main(["data", "stats", str(root), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root}: split 'test' holds no case, expected at least one" in err
