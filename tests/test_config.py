from __future__ import annotations

from pathlib import Path

import pytest

from crln.config import PRESET_DIR, apply_overrides, build_config, config_to_dict, load_config
from crln.errors import CrlnError


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads(preset: str) -> None:
    config = load_config(preset)
    assert all(s % 16 == 0 for s in config.data.patch_size)
    # Round trip: the resolved dict rebuilds the same config (what checkpoints rely on).
    assert config_to_dict(build_config(config_to_dict(config))) == config_to_dict(config)


def test_overrides_are_typed_and_nested() -> None:
    config = load_config(
        "la", ["optim.lr=2e-2", "data.patch_size=[64,64,48]", "method.dice_weight=1", "train.deterministic=true"]
    )
    assert config.optim.lr == 0.02
    assert config.data.patch_size == (64, 64, 48)
    assert config.method.dice_weight == 1.0
    assert config.train.deterministic is True


def test_scalar_patch_size_broadcasts() -> None:
    assert load_config("la", ["data.patch_size=96"]).data.patch_size == (96, 96, 96)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lrr=0.1", "did you mean 'lr'"),
        ("optim.lr=fast", "optim.lr"),
        ("data.patch_size=[56,56,40]", "multiple of 16"),
        ("data.labeled=0", "data.labeled"),
        ("train.iterations=abc", "train.iterations"),
        ("train.amp=fp8", "train.amp"),
        ("method.name=supervisd", "did you mean 'supervised'"),
        ("noequals", "key=value"),
        ("data.patch_size=[64,64]", "3 values"),
        ("method.ema_decay=0.9", "method.ema_decay"),
    ],
)
def test_bad_config_values_raise_one_line(override: str, fragment: str) -> None:
    with pytest.raises(CrlnError) as info:
        load_config("la", [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_preset_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(CrlnError, match="no such file or preset"):
        load_config("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(CrlnError, match="invalid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(CrlnError, match="mapping"):
        load_config(str(listy))


def test_yaml_loader_is_safe(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(CrlnError, match="invalid YAML"):
        load_config(str(evil))


def test_apply_overrides_does_not_mutate_input() -> None:
    raw = {"optim": {"lr": 0.1}}
    out = apply_overrides(raw, ["optim.lr=0.2"])
    assert raw["optim"]["lr"] == 0.1 and out["optim"]["lr"] == 0.2


def test_base_preset_inheritance(tmp_path: Path) -> None:
    config = load_config("la_cpu_mean_teacher")
    assert config.method.name == "mean_teacher"
    assert config.data.patch_size == (64, 64, 48)  # inherited from la_cpu
    child = tmp_path / "child.yaml"
    child.write_text("base: la_cpu\noptim:\n  lr: 0.05\n")
    merged = load_config(str(child))
    assert merged.optim.lr == 0.05 and merged.optim.momentum == 0.9 and merged.data.name == "LA_0.5"
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(CrlnError, match="circular"):
        load_config(str(loop))


def _nifti_root(tmp_path: Path, labels: dict[str, int], channels: int) -> Path:
    import json

    (tmp_path / "imagesTr").mkdir()
    meta = {"labels": labels, "channel_names": {str(k): f"m{k}" for k in range(channels)}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    return tmp_path


def test_dataset_json_gives_classes_and_channels_when_unset(tmp_path: Path) -> None:
    root = _nifti_root(tmp_path, {"background": 0, "a": 1, "b": 2}, channels=2)
    config = load_config("demo", [f"data.root={root}", "data.format=nifti"])
    assert (config.data.num_classes, config.model.in_channels) == (3, 2)
    agreeing = load_config("demo", [f"data.root={root}", "data.format=nifti", "data.num_classes=3"])
    assert agreeing.data.num_classes == 3
    h5 = load_config("demo", [f"data.root={root}"])  # not read as a NIfTI folder: defaults stay
    assert (h5.data.num_classes, h5.model.in_channels) == (2, 1)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.num_classes=2", "data.num_classes = 2 contradicts {root}: 'labels' (background, a, b) gives 3"),
        ("model.in_channels=1", "model.in_channels = 1 contradicts {root}: 'channel_names' (m0, m1) gives 2"),
    ],
)
def test_dataset_json_contradiction_is_refused(tmp_path: Path, override: str, fragment: str) -> None:
    root = _nifti_root(tmp_path, {"background": 0, "a": 1, "b": 2}, channels=2)
    with pytest.raises(CrlnError) as err:
        load_config("demo", [f"data.root={root}", "data.format=nifti", override])
    assert fragment.format(root=root / "dataset.json") in str(err.value)


def test_dataset_json_with_background_only_names_the_file(tmp_path: Path) -> None:
    root = _nifti_root(tmp_path, {"background": 0}, channels=1)
    with pytest.raises(
        CrlnError, match=r"data.num_classes: expected an integer >= 2, got 1 \(taken from .*dataset.json\)"
    ):
        load_config("demo", [f"data.root={root}", "data.format=nifti"])
