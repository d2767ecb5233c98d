"""Bad input refused early, in one line: config sections and ranges, prepare's resume, seeds; strict summary.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import assert_user_error
from crln.config import load_config
from crln.data.h5 import read_h5_case
from crln.data.phantom import write_phantom_h5_dataset
from crln.data.prepare import SCALE_RECORD, prepare_h5_dataset, recorded_scale
from crln.errors import CrlnError
from crln.metrics import summarize
from crln.results import write_summary
from raw_fixtures import write_la_raw

SHAPE = (32, 32, 24)
PREPARE_MANIFEST = "prepare.json"  # crln.data.prepare.PREPARE_MANIFEST, spelled out as users see it


def _quiet(message: str) -> None:
    """A progress sink that drops the lines."""


@pytest.fixture
def h5_src(tmp_path: Path) -> Path:
    return write_phantom_h5_dataset(tmp_path / "src", n_train=2, n_test=1, shape=SHAPE, seed=0)


# --- 1: crln data prepare --scale into a folder prepared at another scale


def test_rescale_refuses_a_folder_prepared_at_another_scale(
    h5_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    prepare_h5_dataset(h5_src, dst, scale=0.5, log=_quiet)
    before = {p: p.stat().st_mtime_ns for p in dst.rglob("*")}
    line = assert_user_error(
        ["data", "prepare", "--src", h5_src, "--dst", dst, "--scale", "0.25"],
        capsys,
        str(dst / PREPARE_MANIFEST),
        "'scale': 0.5",
        "'scale': 0.25",
    )
    assert "use a new --dst" in line
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*")} == before  # nothing rewritten, the record kept
    assert recorded_scale(dst) == 0.5
    with pytest.raises(CrlnError, match="other options"):
        prepare_h5_dataset(h5_src, dst, scale=0.5, label_mode="nearest", log=_quiet)


def test_rescale_resumes_with_the_same_options(h5_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    first = prepare_h5_dataset(h5_src, dst, scale=0.5, log=_quiet)
    (dst / "data" / "case_000.h5").unlink()  # as if interrupted before the last cases
    again = prepare_h5_dataset(h5_src, dst, scale=0.5, log=_quiet)
    assert first["written"] == 3 and again["written"] == 1 and again["skipped"] == 2
    assert json.loads((dst / PREPARE_MANIFEST).read_text())["options"]["scale"] == 0.5
    assert read_h5_case(dst / "data" / "case_000.h5", "case_000").image.shape == (16, 16, 12)


def test_rescale_of_a_folder_prepared_before_the_manifest(h5_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    prepare_h5_dataset(h5_src, dst, scale=0.5, log=_quiet)
    (dst / PREPARE_MANIFEST).unlink()  # what an earlier crln left: the scale record only
    with pytest.raises(CrlnError, match=rf"{re.escape(str(dst))}: prepared at scale 0\.5 .*requested 0\.25"):
        prepare_h5_dataset(h5_src, dst, scale=0.25, log=_quiet)
    again = prepare_h5_dataset(h5_src, dst, scale=0.5, log=_quiet)
    assert again["skipped"] == 3 and (dst / PREPARE_MANIFEST).is_file()
    # cases without any record of their scale (an interrupted early run) cannot be trusted
    (dst / PREPARE_MANIFEST).unlink()
    (dst / SCALE_RECORD).unlink()
    with pytest.raises(CrlnError, match=r"neither prepare\.json nor crln_scale\.json records their options"):
        prepare_h5_dataset(h5_src, dst, scale=0.5, log=_quiet)


# --- 2: a config section given a scalar


@pytest.mark.parametrize("source", ["override", "yaml"])
def test_method_given_a_scalar_is_one_error_line(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if source == "yaml":
        path = tmp_path / "m.yaml"
        path.write_text("base: la_cpu\nmethod: crln\n")
        argv: list[object] = ["config", path]
    else:
        argv = ["config", "la_cpu", "method=crln"]
    assert_user_error(argv, capsys, "config key method: expected a mapping such as method.name=crln, got 'crln'")


@pytest.mark.parametrize("section", ["data", "model", "optim", "train", "eval", "logging", "distributed", "method"])
@pytest.mark.parametrize("value", ["x", "0", "[1]", "false"])
def test_every_section_refuses_a_scalar(section: str, value: str) -> None:
    with pytest.raises(CrlnError, match=rf"config key {section}: expected a mapping"):
        load_config("la_cpu", [f"{section}={value}"])


# --- 3: range checks of validate_config


@pytest.mark.parametrize(
    "override",
    [
        "model.n_filters=0",
        "model.dropout=1.5",
        "model.dropout=-0.1",
        "eval.bootstrap_resamples=0",
        "train.seed=-1",
        "train.threads=-2",
        "optim.poly_power=-1",
        "optim.grad_clip=-1",
        "data.noise_clip=-0.2",
        "method.dice_weight=-1",
        "method.ce_weight=-0.5",
    ],
)
def test_out_of_range_values_are_refused_at_load(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(CrlnError, match=rf"^config key {key}: expected "):
        load_config("demo", [override])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method.name=mean_teacher", "method.strong_noise_clip=-0.1"], "strong_noise_clip"),
        (["method.name=crln", "method.strong_noise_clip=-0.1"], "strong_noise_clip"),
        (["method.name=ua_mt", "method.input_noise_clip=-0.1"], "input_noise_clip"),
    ],
)
def test_negative_method_noise_clips_are_refused(overrides: list[str], fragment: str) -> None:
    with pytest.raises(CrlnError, match=rf"^config section method: .*{fragment}.* must be >= 0"):
        load_config("demo", overrides)


def test_edge_values_still_load() -> None:
    config = load_config(
        "demo", ["model.n_filters=1", "model.dropout=0.5", "eval.bootstrap_resamples=1", "train.seed=0"]
    )
    assert config.model.n_filters == 1 and config.train.seed == 0


# --- 4: a negative --seed


@pytest.mark.parametrize("argv", [["data", "prepare", "la"], ["data", "phantom"]])
def test_negative_seed_is_one_error_line(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    write_la_raw(raw, n_cases=2)
    dst = tmp_path / "out"
    src = ["--src", raw] if "prepare" in argv else []
    assert_user_error([*argv, *src, "--dst", dst, "--seed", "-1"], capsys, "--seed -1: expected an integer >= 0")
    assert not dst.exists()


# --- 5: summary.json is strict JSON


def _strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_writes_undefined_statistics_as_null(tmp_path: Path) -> None:
    import numpy as np

    from crln.report.build import _summary_rows

    rows = [{"dice": 0.0, "hd95": float("nan")}, {"dice": 0.5, "hd95": float("nan")}]
    path = tmp_path / "summary.json"
    write_summary(path, {"metrics": summarize(rows), "seconds": np.float32(1.5), "inf": [float("inf")]})
    summary = _strict(path.read_text())
    hd95 = summary["metrics"]["hd95"]
    assert hd95["mean"] is None and hd95["boot_std"] is None and hd95["n"] == 0 and hd95["n_undefined"] == 2
    assert summary["seconds"] == 1.5 and summary["inf"] == [None]
    # the report, which reads summary.json, shows a null as undefined
    table = {row[0].split()[0]: row for row in _summary_rows(summary["metrics"], "voxels")}
    assert table["95HD"][1:3] == ["– ± –", "– ± –"] and table["Dice"][1] != "– ± –"
