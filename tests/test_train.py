"""End-to-end training on phantoms: the loss goes down, resume is exact, the run folder is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, train_interrupted
from crln.config import load_config
from crln.engine.callbacks import Callback
from crln.engine.checkpoint import load_checkpoint
from crln.engine.run_folder import read_log
from crln.engine.trainer import train
from crln.errors import CrlnError


def test_supervised_run_lowers_loss_and_writes_run_folder(phantom_root: Path, tmp_path: Path) -> None:
    config = load_config(
        "demo",
        tiny_overrides(
            phantom_root,
            tmp_path,
            **{
                "train.iterations": 40,
                "train.log_every": 5,
                "train.val_every": 20,
                "optim.lr": 0.05,
                "model.n_filters": 8,
            },
        ),
    )
    result = train(config, progress=False)
    run = result.run_dir
    assert run == tmp_path / "phantom" / "supervised__vnet__demo" / "seed1337"
    for name in (
        "config.yaml",
        "meta.json",
        "log.jsonl",
        "checkpoint_latest.pt",
        "checkpoint_final.pt",
        "checkpoint_best.pt",
    ):
        assert (run / name).is_file(), name
    records = [r for r in read_log(run / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    assert any("val_dice" in r for r in read_log(run / "log.jsonl"))
    meta = json.loads((run / "meta.json").read_text())
    # the phantom's training list is case_000 … case_007: 3 labelled from the start, 1 validation from the end
    assert meta["split"] == {
        "labeled": ["case_000", "case_001", "case_002"],
        "unlabeled": ["case_003", "case_004", "case_005", "case_006"],
        "validation": ["case_007"],
    }
    state = load_checkpoint(run / "checkpoint_final.pt")
    assert state["step"] == 40 and state["config"]["train"]["iterations"] == 40


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint_final.pt")["method_state"]


def test_resume_is_exact(phantom_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        phantom_root,
        tmp_path,
        **{
            "train.iterations": 6,
            "train.checkpoint_every": 3,
            "data.validation": 0,
            "data.noise_sigma": 0.1,
            "model.dropout": 0.2,
        },
    )
    straight = train(load_config("demo", [*overrides, "train.tag=straight"]), progress=False).run_dir

    # Interrupted run: killed when iteration 4 starts (the checkpoint cadence saved iteration 3), then resumed.
    config = load_config("demo", [*overrides, "train.tag=resumed"])
    train_interrupted(config, 3)
    run = straight.parent.parent / "supervised__vnet__resumed" / "seed1337"
    assert load_checkpoint(run / "checkpoint_latest.pt")["step"] == 3
    assert not (run / "checkpoint_final.pt").exists()
    with pytest.raises(CrlnError, match="already holds a run"):
        train(config, progress=False)
    resumed = train(config, resume=True, progress=False).run_dir

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_log(resumed / "log.jsonl") if "loss" in r]
    assert steps == [2, 4, 6]


class _Recorder(Callback):
    """Records each hook call, and at each iteration's end the steps the log already holds."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def on_train_start(self, run: object) -> None:
        self.calls.append(("train_start",))

    def on_step_start(self, run: object, step: int) -> None:
        self.calls.append(("step_start", step))

    def on_step_end(self, run: object, step: int, out: dict[str, torch.Tensor]) -> None:
        logged = [r["step"] for r in read_log(run.folder.log_path) if "loss" in r]  # type: ignore[attr-defined]
        self.calls.append(("step_end", step, run.completed, "loss" in out, logged[-1]))  # type: ignore[attr-defined]

    def on_train_end(self, run: object) -> None:
        self.calls.append(("train_end",))


def test_extra_callbacks_run_after_the_engines_at_each_hook_point(phantom_root: Path, tmp_path: Path) -> None:
    values = {"train.iterations": 2, "train.log_every": 1, "data.validation": 0}
    recorder = _Recorder()
    config = load_config("demo", tiny_overrides(phantom_root, tmp_path, **values))
    result = train(config, progress=False, callbacks=[recorder])
    assert result.complete and result.steps == 2
    # at each iteration's end the engine's metrics callback (first in the order) has already logged it
    assert recorder.calls == [
        ("train_start",),
        ("step_start", 0),
        ("step_end", 0, 1, True, 1),
        ("step_start", 1),
        ("step_end", 1, 2, True, 2),
        ("train_end",),
    ]


def test_first_log_window_after_a_resume_averages_only_its_own_iterations(phantom_root: Path, tmp_path: Path) -> None:
    common = {"train.iterations": 8, "train.checkpoint_every": 3, "data.validation": 0}
    per_step = train(
        load_config(
            "demo", tiny_overrides(phantom_root, tmp_path, **common, **{"train.log_every": 1, "train.tag": "a"})
        ),
        progress=False,
    ).run_dir
    config = load_config(
        "demo", tiny_overrides(phantom_root, tmp_path, **common, **{"train.log_every": 4, "train.tag": "b"})
    )
    train_interrupted(config, 3)  # checkpoint at 3: the window 1–4 is cut after its first 3 iterations
    resumed = train(config, resume=True, progress=False).run_dir
    loss = {r["step"]: r["loss"] for r in read_log(per_step / "log.jsonl") if "loss" in r}
    windows = {r["step"]: r["loss"] for r in read_log(resumed / "log.jsonl") if "loss" in r}
    assert windows[4] == pytest.approx(loss[4], rel=1e-5)  # the resumed process ran iteration 4 only
    assert windows[8] == pytest.approx(sum(loss[k] for k in range(5, 9)) / 4, rel=1e-5)


def test_a_fresh_start_drops_the_log_of_an_abandoned_attempt(phantom_root: Path, tmp_path: Path) -> None:
    # Killed before its first checkpoint: the next run starts from scratch in the same folder.
    common = {"train.iterations": 6, "train.checkpoint_every": 100, "train.log_every": 1, "data.validation": 0}
    config = load_config("demo", tiny_overrides(phantom_root, tmp_path, **common))
    train_interrupted(config, 4)
    run = train(config, progress=False).run_dir
    steps = [r["step"] for r in read_log(run / "log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_without_checkpoint_is_an_error(phantom_root: Path, tmp_path: Path) -> None:
    config = load_config("demo", tiny_overrides(phantom_root, tmp_path))
    with pytest.raises(CrlnError, match="--resume: no checkpoint"):
        train(config, resume=True, progress=False)


def test_diverging_loss_stops_with_the_term_name(phantom_root: Path, tmp_path: Path) -> None:
    config = load_config("demo", tiny_overrides(phantom_root, tmp_path, **{"optim.lr": 1e30, "train.iterations": 20}))
    with pytest.raises(CrlnError, match=r"loss term '\w+' is (nan|inf)"):
        train(config, progress=False)


def test_too_few_cases_for_the_split(phantom_root: Path, tmp_path: Path) -> None:
    config = load_config("demo", tiny_overrides(phantom_root, tmp_path, **{"data.labeled": 50}))
    with pytest.raises(CrlnError, match="labeled"):
        train(config, progress=False)


def test_labels_outside_num_classes_are_refused(tmp_path: Path) -> None:
    from crln.data.phantom import write_phantom_h5_dataset

    root = write_phantom_h5_dataset(tmp_path / "three", n_train=4, n_test=1, shape=(32, 32, 32), seed=1, num_classes=3)
    config = load_config("demo", tiny_overrides(root, tmp_path / "runs", **{"data.labeled": 2}))
    with pytest.raises(CrlnError, match=r"label.*(num_classes|\[0, 1\])"):
        train(config, progress=False)


def test_resume_refuses_a_changed_config(phantom_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(phantom_root, tmp_path, **{"train.iterations": 3, "data.validation": 0})
    train(load_config("demo", overrides), progress=False)
    with pytest.raises(CrlnError, match=r"optim.lr: 0.01 -> 0.5"):
        train(load_config("demo", [*overrides, "optim.lr=0.5"]), resume=True, progress=False)
    # Only the length (and where/how fast it runs) may change on resume.
    result = train(load_config("demo", [*overrides, "train.iterations=5"]), resume=True, progress=False)
    assert result.steps == 5


@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_same_seed_gives_identical_weights(phantom_root: Path, tmp_path: Path, method: str) -> None:
    overrides = tiny_overrides(
        phantom_root,
        tmp_path,
        **{"train.iterations": 4, "data.validation": 0, "method.name": method, "train.deterministic": "true"},
    )
    a = train(load_config("demo", [*overrides, "train.tag=a"]), progress=False).run_dir
    b = train(load_config("demo", [*overrides, "train.tag=b"]), progress=False).run_dir
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tensorboard_logging_writes_the_same_scalars(phantom_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config("demo", tiny_overrides(phantom_root, tmp_path, **{"logging.tensorboard": "true"}))
    run = train(config, progress=False).run_dir
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "loss_dice", "val_dice"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in read_log(run / "log.jsonl") if "loss" in r]


@pytest.mark.slow
def test_train_compile_runs_the_networks_compiled_with_the_same_losses(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.compile=true compiles every network in place (dynamo's eager backend here: the same tracing,
    no C++ build), and the run logs the losses of the uncompiled one; weights keep their checkpoint names."""
    from crln.engine.device import Performance

    compiled: list[str] = []
    original = Performance.compile_networks

    def eager(module: torch.nn.Module, backend: str = "inductor") -> None:
        original(module, backend="eager")
        compiled.extend(name for name, child in module.named_children() if child._compiled_call_impl is not None)

    monkeypatch.setattr(Performance, "compile_networks", staticmethod(eager))
    overrides = tiny_overrides(phantom_root, tmp_path, **{"train.iterations": 2, "train.log_every": 1})
    runs = [
        train(load_config("demo", [*overrides, f"train.compile={c}", f"train.tag=c{c}"]), progress=False)
        for c in ("false", "true")
    ]
    assert compiled == ["student"]
    plain, fast = ([r["loss"] for r in read_log(run.run_dir / "log.jsonl") if "loss" in r] for run in runs)
    assert plain == pytest.approx(fast, rel=1e-4)
    assert _weights(runs[0].run_dir).keys() == _weights(runs[1].run_dir).keys()
