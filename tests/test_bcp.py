"""BCP: the copy-paste cube, both mixed volumes and their targets, the loss weights, the pseudo-label
filter, the engine's stage switch and an exact resume across it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, train_interrupted
from crln.config import load_config
from crln.data.batch import Batch
from crln.engine.checkpoint import load_checkpoint
from crln.engine.run_folder import RunFolder, read_log
from crln.errors import CrlnError
from crln.methods import build_method
from crln.methods.bcp import BCP, BCPConfig, copy_paste_cube, largest_component_labels, region_dice_ce
from crln.models import VNet

SHAPE = (32, 32, 16)  # VNet needs multiples of 16


def _bcp(num_classes: int = 2, **overrides: object) -> BCP:
    torch.manual_seed(0)
    method = build_method(BCPConfig(**overrides), lambda: VNet(num_classes=num_classes, n_filters=4), num_classes)
    assert isinstance(method, BCP)
    return method


def _source_batch() -> Batch:
    """Labelled a, b and unlabelled a, b filled with 1, 2, 3, 4; labelled labels are 0 (a) and 1 (b)."""

    def volume(value: float) -> torch.Tensor:
        return torch.full((1, 1, *SHAPE), float(value))

    return Batch(
        labeled_image=torch.cat([volume(1), volume(2)]),
        labeled_label=torch.cat([torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE)]).long(),
        unlabeled_image=torch.cat([volume(3), volume(4)]),
    )


def test_copy_paste_cube_is_one_box_of_two_thirds() -> None:
    torch.manual_seed(3)
    cube = copy_paste_cube((48, 30, 12), 2 / 3)
    assert cube.shape == (48, 30, 12) and cube.dtype == torch.bool
    sides = [int(cube.any(dim=tuple(d for d in range(3) if d != axis)).sum()) for axis in range(3)]
    assert sides == [32, 20, 8]
    assert int(cube.sum()) == 32 * 20 * 8  # a solid box: its projections multiply to its volume


def test_pretraining_pastes_labelled_b_into_labelled_a_with_its_labels() -> None:
    batch = _source_batch()
    cube = copy_paste_cube(SHAPE, 2 / 3)
    image, label = BCP.pretraining_mix(batch, cube)
    assert image.shape == (1, 1, *SHAPE) and label.shape == (1, *SHAPE)
    assert torch.equal(image[0, 0] == 2, cube) and torch.all(image[0, 0][~cube] == 1)
    assert torch.equal(label[0], image[0, 0].long() - 1)  # every voxel keeps its volume's label


def test_bidirectional_mix_takes_each_voxel_and_its_target_from_one_source() -> None:
    batch = _source_batch()
    pseudo = (torch.full((1, *SHAPE), 2), torch.full((1, *SHAPE), 3))  # pseudo-labels of unlabelled a and b
    cube = copy_paste_cube(SHAPE, 2 / 3)
    mixed = _bcp(num_classes=4).mixed_batches(batch, cube, pseudo)
    mix_l, mix_u = mixed["mix_l"][0, 0], mixed["mix_u"][0, 0]
    # mix_l: labelled a around the cube, unlabelled a inside; mix_u: unlabelled b around, labelled b inside.
    assert torch.all(mix_l[cube] == 3) and torch.all(mix_l[~cube] == 1)
    assert torch.all(mix_u[cube] == 2) and torch.all(mix_u[~cube] == 4)
    # Targets: image value v came from the volume whose label (ground truth or pseudo) is v - 1.
    assert torch.equal(mixed["mix_l_target"][0], mix_l.long() - 1)
    assert torch.equal(mixed["mix_u_target"][0], mix_u.long() - 1)


def test_region_dice_ce_is_the_loss_of_the_region_alone() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, *SHAPE, generator=g)
    target = torch.randint(0, 3, (2, *SHAPE), generator=g)
    region = torch.zeros(SHAPE, dtype=torch.bool)
    region[4:16, 2:20, 3:9] = True
    dice, ce = region_dice_ce(logits, target, region)
    crop = (..., slice(4, 16), slice(2, 20), slice(3, 9))
    dice_crop, ce_crop = region_dice_ce(logits[crop], target[crop])
    assert dice == pytest.approx(float(dice_crop), abs=1e-6) and ce == pytest.approx(float(ce_crop), abs=1e-6)
    whole = region_dice_ce(logits, target, torch.ones(SHAPE))
    assert all(torch.equal(a, b) for a, b in zip(region_dice_ce(logits, target), whole))


def test_pseudo_labelled_voxels_weigh_unlabeled_weight_and_ground_truth_one() -> None:
    batch = _source_batch()

    def step_with_pseudo_labels(value: int, weight: float) -> dict[str, torch.Tensor]:
        method = _bcp(pretrain_iterations=0, unlabeled_weight=weight)
        method.pseudo_labels = lambda images: (  # type: ignore[method-assign]
            torch.full((images.shape[0], *SHAPE), value),
            torch.zeros(()),
        )
        torch.manual_seed(1)  # the same cube every time
        return method.train_step(batch, step=0)

    background, foreground = step_with_pseudo_labels(0, 0.0), step_with_pseudo_labels(1, 0.0)
    assert float(background["loss_unsup"]) != float(foreground["loss_unsup"])
    assert torch.equal(background["loss"], foreground["loss"])  # weight 0: the pseudo-labels do not count
    assert torch.equal(background["loss_sup"], foreground["loss_sup"])  # ground-truth voxels: their own term
    out = step_with_pseudo_labels(1, 0.5)
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss_sup"] + 0.5 * out["loss_unsup"]), rel=1e-6)
    assert float(out["loss_sup"]) == pytest.approx(float(foreground["loss_sup"]), rel=1e-6)


def test_largest_component_filter_keeps_one_blob_per_class() -> None:
    labels = torch.zeros(2, *SHAPE, dtype=torch.int64)
    labels[0, 0:2, 0:2, 0:2] = 1  # 8 voxels
    labels[0, 10:13, 10:13, 5:8] = 1  # 27 voxels: kept
    labels[0, 20:22, 20:22, 0:1] = 2  # class 2, 4 voxels: kept (its own largest)
    labels[0, 0:1, 20:21, 10:11] = 2  # class 2, 1 voxel
    filtered = largest_component_labels(labels)
    assert int((filtered[0] == 1).sum()) == 27 and int(filtered[0, 11, 11, 6]) == 1
    assert int((filtered[0] == 2).sum()) == 4 and int(filtered[0, 0, 20, 10]) == 0
    assert torch.equal(filtered[1], labels[1])  # empty stays empty


def test_teacher_pseudo_labels_are_filtered_and_the_removal_logged() -> None:
    method = _bcp()
    two_blobs = torch.zeros(1, 2, *SHAPE)
    two_blobs[:, 1, 0:2, 0:2, 0:2] = 1.0  # 8 voxels
    two_blobs[:, 1, 10:14, 10:14, 4:8] = 1.0  # 64 voxels
    method.teacher.forward = lambda x: two_blobs.expand(x.shape[0], -1, -1, -1, -1)  # type: ignore[method-assign]
    labels, removed = method.pseudo_labels(torch.zeros(1, 1, *SHAPE))
    assert int(labels.sum()) == 64 and float(removed) == pytest.approx(8 / 72)
    method.config.largest_component = False  # type: ignore[attr-defined]
    labels, removed = method.pseudo_labels(torch.zeros(1, 1, *SHAPE))
    assert int(labels.sum()) == 72 and float(removed) == 0.0


def test_stages_by_step_and_teacher_copy_at_the_boundary() -> None:
    method = _bcp(pretrain_iterations=5)
    assert [s.step for s in method.stage_starts()] == [5]
    out = method.train_step(_source_batch(), step=4)
    assert float(out["self_training"]) == 0.0 and float(out["loss_unsup"]) == 0.0
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    method.after_optimizer_step(4)  # no EMA in pre-training
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters()))
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.start_stage(5)
    assert all(
        torch.equal(t, s) for t, s in zip(method.teacher.state_dict().values(), method.student.state_dict().values())
    )
    assert float(method.train_step(_source_batch(), step=5)["self_training"]) == 1.0
    assert _bcp(pretrain_iterations=0).stage_starts() == ()


def _overrides(root: Path, out: Path, **extra: object) -> list[str]:
    # 6 iterations, the last 3 self-training; no validation (not what these tests look at).
    values = {"method.name": "bcp", "method.pretrain_iterations": 3, "data.validation": 0, **extra}
    return tiny_overrides(root, out, **values)


@pytest.fixture(scope="module")
def straight_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted 6-iteration run, logged every iteration, with a spy on the engine's stage switch."""
    import crln.engine.trainer as trainer_module

    seen = []
    original = trainer_module._start_stage

    def spy(method: BCP, stage: object, optimizer: torch.optim.Optimizer) -> None:
        had_state = len(optimizer.state) > 0
        original(method, stage, optimizer)
        seen.append((stage.step, had_state, len(optimizer.state)))  # type: ignore[attr-defined]

    out = tmp_path_factory.mktemp("bcp_runs")
    config = load_config("demo", [*_overrides(phantom_root, out, **{"train.log_every": 1}), "train.tag=straight"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "_start_stage", spy)
        run_dir = trainer_module.train(config, progress=False).run_dir
    return {"run_dir": run_dir, "seen": seen, "lr": config.optim.lr, "out": out}


def test_engine_switches_stage_once_with_fresh_optimizer_and_lr(straight_run: dict) -> None:
    assert straight_run["seen"] == [(3, True, 0)]  # once, at iteration 3: momentum buffers existed and were dropped
    records = [r for r in read_log(straight_run["run_dir"] / "log.jsonl") if "loss" in r]
    assert [r["self_training"] for r in records] == [0, 0, 0, 1, 1, 1]
    lr, base = [r["lr"] for r in records], straight_run["lr"]
    assert lr[3] == pytest.approx(base) and lr[2] < lr[3]  # the poly schedule starts again at self-training
    assert lr[4] == pytest.approx(base * (1 - 1 / 3) ** 0.9)  # over the 3 self-training iterations
    assert all(r["lcc_removed_fraction"] == 0 for r in records[:3]) and all(r["loss_unsup"] > 0 for r in records[3:])


@pytest.mark.parametrize(("checkpoint_every", "interrupt_after"), [(2, 3), (3, 4)])
def test_bcp_resume_across_the_stage_boundary_is_exact(
    phantom_root: Path, straight_run: dict, checkpoint_every: int, interrupt_after: int
) -> None:
    """Resumed before the boundary (checkpoint 2) or at it (checkpoint 3): bit-identical to a straight run."""
    import crln.engine.trainer as trainer_module

    overrides = _overrides(phantom_root, straight_run["out"], **{"train.checkpoint_every": checkpoint_every})
    config = load_config("demo", [*overrides, f"train.tag=resumed{checkpoint_every}"])
    train_interrupted(config, interrupt_after)
    assert load_checkpoint(RunFolder.for_config(config).checkpoint("latest"))["step"] == checkpoint_every
    resumed = trainer_module.train(config, resume=True, progress=False).run_dir
    a = load_checkpoint(straight_run["run_dir"] / "checkpoint_final.pt")
    b = load_checkpoint(resumed / "checkpoint_final.pt")
    assert a["method_state"].keys() == b["method_state"].keys()
    for key in a["method_state"]:
        assert torch.equal(a["method_state"][key], b["method_state"][key]), key
    assert all(torch.equal(x, y) for x, y in zip(_momentum(a), _momentum(b), strict=True))


def _momentum(checkpoint: dict) -> list[torch.Tensor]:
    return [s["momentum_buffer"] for _, s in sorted(checkpoint["optimizer"]["state"].items())]


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"data.labeled_batch_size": 3, "data.unlabeled_batch_size": 3}, "data.labeled_batch_size"),
        ({"data.unlabeled_batch_size": 4}, "data.labeled_batch_size"),
        ({"method.pretrain_iterations": 6}, "method.pretrain_iterations"),
    ],
)
def test_config_names_the_bcp_rule_it_breaks(phantom_root: Path, tmp_path: Path, extra: dict, key: str) -> None:
    with pytest.raises(CrlnError, match=re.escape(f"config key {key}")):
        load_config("demo", _overrides(phantom_root, tmp_path, **extra))


def test_presets_load() -> None:
    paper, cpu = load_config("la_bcp"), load_config("la_cpu_bcp")
    assert paper.method.pretrain_iterations == 2000 and paper.train.iterations == 17000  # type: ignore[attr-defined]
    assert cpu.method.pretrain_iterations == round(1000 * 2000 / 17000) and cpu.train.iterations == 1000  # type: ignore[attr-defined]
    assert load_config("pancreas_bcp").method.restart_optimizer is False  # type: ignore[attr-defined]


def test_schedule_window_restarts_at_each_stage() -> None:
    from crln.engine.schedule import schedule_window

    assert [schedule_window(s, 10, []) for s in (0, 9)] == [(0, 10), (9, 10)]
    assert [schedule_window(s, 10, [4]) for s in (0, 3, 4, 9)] == [(0, 4), (3, 4), (0, 6), (5, 6)]
    assert [schedule_window(s, 10, [2, 5]) for s in (1, 2, 4, 5, 9)] == [(1, 2), (0, 3), (2, 3), (0, 5), (4, 5)]
