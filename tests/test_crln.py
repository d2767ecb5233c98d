"""CRLN: DIM and CPS shapes, ablation switches, rectification schedule, μ's own step, EMA, CutMix
alignment, CPS sampling, and short engine runs (loss goes down, telemetry logged, exact resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, train_interrupted
from crln.config import OptimConfig, load_config
from crln.data.batch import Batch
from crln.engine.checkpoint import load_checkpoint, save_checkpoint
from crln.engine.run_folder import RunFolder, read_log
from crln.engine.trainer import step_extra_optimizers
from crln.errors import CrlnError
from crln.methods import build_method
from crln.methods.cps import cps_loss, gather_voxels, positive_prototypes, sample_cps
from crln.methods.crln import CRLN, CRLNConfig
from crln.methods.dim import DynamicInteractionModule, Rectifier
from crln.models import VNet

SHAPE = (32, 32, 16)


def _batch(num_classes: int = 2, shape: tuple[int, int, int] = SHAPE, oracle: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(2, *shape, dtype=torch.int64)
    label[:, 8:24, 8:24, 4:12] = 1
    if num_classes > 2:
        label[:, 12:20, 12:20, 6:10] = 2
    image = torch.randn(2, 1, *shape, generator=g) * 0.3 + label.unsqueeze(1).float()
    unlabeled = torch.randn(2, 1, *shape, generator=g) * 0.3 + label.flip(1).unsqueeze(1).float()
    return Batch(
        labeled_image=image,
        labeled_label=label,
        unlabeled_image=unlabeled,
        unlabeled_oracle_label=label.flip(1) if oracle else None,
    )


def _crln(num_classes: int = 2, **overrides: object) -> CRLN:
    torch.manual_seed(0)
    method = build_method(CRLNConfig(**overrides), lambda: VNet(num_classes=num_classes, n_filters=4), num_classes)
    assert isinstance(method, CRLN)
    return method


def _after_step(method: CRLN, step: int) -> None:
    """What the engine runs after the main optimiser step: the method's hook, then its own optimisers (μ)."""
    method.after_optimizer_step(step)
    step_extra_optimizers(method.configure_optimizers(OptimConfig()), step)


@pytest.mark.parametrize(("num_classes", "shape"), [(2, (32, 32, 16)), (3, (48, 32, 16))])
def test_dim_and_cps_shapes(num_classes: int, shape: tuple[int, int, int]) -> None:
    net = VNet(num_classes=num_classes, n_filters=4)
    _, feats = net(torch.randn(2, 1, *shape), return_features=True)
    for upsample in ("deconv", "deconv_relu", "trilinear"):
        dim = DynamicInteractionModule(num_classes, 5, 16, 8, upsample=upsample)
        assert dim.prototypes.shape == (num_classes, 5, 16)
        prox = dim.proximity(feats["quarter"], feats["half"])
        assert prox.shape == (2, num_classes, 5, *(s // 2 for s in shape))
        assert dim(feats["quarter"], feats["half"]).shape == (2, num_classes, *shape)
    method = _crln(num_classes, rectify_start=0)
    out = method.train_step(_batch(num_classes, shape), step=0)
    assert torch.isfinite(out["loss"]) and out["loss_cps"] > 0 and out["loss_dim"] > 0
    rep = method.cps_head(feats["full"])  # type: ignore[misc]
    assert rep.shape == (2, 16, *shape)  # projection dim R (code default)
    assert positive_prototypes(method.student_dim.prototypes, "features").shape == (num_classes, 16)  # type: ignore[union-attr]
    assert positive_prototypes(method.student_dim.prototypes, "prototypes").shape == (num_classes, 16)  # type: ignore[union-attr]


def test_dim_output_is_signed_unless_the_code_relu_is_asked_for() -> None:
    """Eq. 6 ends with the up-sampling: M(x) must be able to go negative (a ReLU there went dead on LA)."""
    torch.manual_seed(0)
    net = VNet(n_filters=4)
    _, feats = net(torch.randn(2, 1, *SHAPE), return_features=True)
    paper = DynamicInteractionModule(2, 3, 16, 8, upsample="deconv")
    code = DynamicInteractionModule(2, 3, 16, 8, upsample="deconv_relu")
    code.load_state_dict(paper.state_dict())  # same parameters, only the ReLU differs
    m_paper, m_code = paper(feats["quarter"], feats["half"]), code(feats["quarter"], feats["half"])
    assert (m_paper < 0).any() and (m_paper > 0).any()
    assert torch.equal(m_code, m_paper.clamp_min(0))
    with pytest.raises(ValueError, match="upsample"):
        DynamicInteractionModule(2, 3, 16, 8, upsample="relu")


def test_block_one_softmax_runs_over_the_spatial_axis() -> None:
    net = VNet(n_filters=4)
    _, feats = net(torch.randn(1, 1, *SHAPE), return_features=True)
    dim = DynamicInteractionModule(2, 3, 16, 8)
    dim.proximity(feats["quarter"], feats["half"], keep_attention=True)
    attention = dim.block1.last_attention
    n2 = feats["quarter"][0, 0].numel()
    assert attention is not None and attention.shape == (1, 2 * 3, n2)
    assert torch.allclose(attention.sum(dim=-1), torch.ones(1, 6), atol=1e-5)
    assert not torch.allclose(attention.sum(dim=1), torch.ones(1, n2))


def test_cross_class_reasoning_shares_aggregation_weights() -> None:
    C, R = 3, 4
    shared = DynamicInteractionModule(C, R, 16, 8, cross_class=True, upsample="trilinear")
    per_class = DynamicInteractionModule(C, R, 16, 8, cross_class=False, upsample="trilinear")

    def count(m: DynamicInteractionModule) -> int:
        return sum(p.numel() for p in [*m.sa.parameters(), *m.ci.parameters()])  # type: ignore[union-attr]

    assert count(shared) == R * R * 27 + R + R + 1
    assert count(per_class) == C * count(shared)
    # Shared weights: permuting the classes of M^II permutes the output; per-class weights do not.
    prox = torch.randn(1, C, R, 4, 4, 4)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        assert torch.allclose(shared.aggregate(prox[:, perm]), shared.aggregate(prox)[:, perm], atol=1e-6)
        assert not torch.allclose(per_class.aggregate(prox[:, perm]), per_class.aggregate(prox)[:, perm], atol=1e-3)
    # SA and CI off: the plain sum over the R prototypes (Tab. 6, first row).
    plain = DynamicInteractionModule(C, R, 16, 8, spatial_awareness=False, conv_integration=False)
    assert torch.allclose(plain.aggregate(prox), prox.sum(dim=2))


def test_rectification_starts_exactly_at_s() -> None:
    method = _crln(rectify_start=2, mu_init=0.3)
    batch = _batch()
    flags = []
    for step in range(4):
        raw, rectified = method.teacher_pseudo_labels(batch.unlabeled_image, step)  # type: ignore[arg-type]
        flags.append(not torch.equal(raw, rectified))
        assert method.train_step(batch, step)["rectified"] == float(step >= 2)
    assert flags == [False, False, True, True]


@pytest.mark.parametrize("mu_step_input", ["current", "post_update"])
def test_mu_moves_only_through_its_own_step_and_stays_in_unit_interval(mu_step_input: str) -> None:
    method = _crln(mu_init=0.5, mu_lr=1e4, mu_step_input=mu_step_input, rectify_start=0)
    mu_raw = method.rectifier.mu_raw  # type: ignore[union-attr]
    assert mu_raw is not None
    assert all(p is not mu_raw for p in method.trainable_parameters())
    out = method.train_step(_batch(), step=0)
    assert torch.autograd.grad(out["loss"], mu_raw, retain_graph=True, allow_unused=True)[0] is None
    out["loss"].backward()
    assert mu_raw.grad is None and float(mu_raw.detach()) == 0.5
    _after_step(method, 0)  # the alternating eq. 16 step
    assert float(mu_raw.detach()) != 0.5 and 0.0 <= float(method.rectifier.mu().detach()) <= 1.0  # type: ignore[union-attr]
    assert float(method.rect_momentum_0) != 0.0  # optimiser state lives in the state_dict
    assert "rect_momentum_0" in method.state_dict()
    sig = Rectifier("learnable_v3", 2, mu_param="sigmoid", mu_init=0.25)
    assert float(sig.mu().detach()) == pytest.approx(0.25)  # type: ignore[arg-type]


def test_ema_updates_teacher_backbone_dim_and_prototypes_without_gradients() -> None:
    method = _crln(ema_decay=0.5, rectify_start=0)
    out = method.train_step(_batch(), step=0)
    out["loss"].backward()
    for p in [*method.teacher.parameters(), *method.teacher_dim.parameters()]:  # type: ignore[union-attr]
        assert p.grad is None and not p.requires_grad
    assert method.student_dim.prototypes.grad is not None  # type: ignore[union-attr]
    before = {
        "backbone": [p.clone() for p in method.teacher.parameters()],
        "dim": [p.clone() for p in method.teacher_dim.parameters()],  # type: ignore[union-attr]
    }
    with torch.no_grad():
        for p in [*method.student.parameters(), *method.student_dim.parameters()]:  # type: ignore[union-attr]
            p.add_(1.0)
    method.after_optimizer_step(step=100)
    after = {"backbone": list(method.teacher.parameters()), "dim": list(method.teacher_dim.parameters())}  # type: ignore[union-attr]
    for key in before:
        for a, b in zip(after[key], before[key]):
            assert not torch.equal(a, b), key
    student_p = method.student_dim.prototypes  # type: ignore[union-attr]
    teacher_p = method.teacher_dim.prototypes  # type: ignore[union-attr]
    assert torch.allclose(teacher_p, 0.5 * (before["dim"][0] + student_p))


def test_rectified_pseudo_labels_are_cutmixed_with_the_image() -> None:
    method = _crln(rectify_start=0, strong_noise_sigma=0.0, mu_init=0.0)
    seen: dict[str, torch.Tensor] = {}
    original_teacher, original_view = method.teacher_pseudo_labels, method.strong_view

    def teacher(weak: torch.Tensor, step: int):
        raw, rectified = original_teacher(weak, step)
        seen["rectified"] = rectified
        return raw, rectified

    def view(weak: torch.Tensor, probs: torch.Tensor):
        strong, mixed = original_view(weak, probs)
        seen.update(weak=weak, probs_in=probs, strong=strong, mixed=mixed)
        return strong, mixed

    method.teacher_pseudo_labels = teacher  # type: ignore[method-assign]
    method.strong_view = view  # type: ignore[method-assign]
    batch = _batch()
    batch.unlabeled_image = torch.stack([torch.full((1, *SHAPE), 0.0), torch.full((1, *SHAPE), 1.0)])
    method.train_step(batch, step=0)
    assert torch.equal(seen["probs_in"], seen["rectified"])  # rectify first, then mix
    from_other = seen["strong"][:, 0] != seen["weak"][:, 0]  # voxels pasted from the other sample
    assert from_other.any() and (~from_other).any()
    expected = torch.where(from_other.unsqueeze(1), seen["rectified"].roll(1, dims=0), seen["rectified"])
    assert torch.allclose(seen["mixed"], expected)


def test_cps_sampling_respects_masks_and_caps() -> None:
    torch.manual_seed(0)
    B, C, shape = 2, 3, (4, 4, 4)
    label = torch.randint(0, C, (B, *shape))
    valid = torch.nn.functional.one_hot(label, C).movedim(-1, 1).bool()
    valid[1, :, :2] = False  # unreliable pseudo-labels: in no set
    probs = torch.rand(B, C, *shape)
    flat_valid = valid.permute(0, 2, 3, 4, 1).reshape(-1, C)
    flat_probs = probs.permute(0, 2, 3, 4, 1).reshape(-1, C)
    samples = sample_cps(valid, probs, threshold=0.5, num_anchors=7, num_negatives=5)
    assert [s.cls for s in samples] == [0, 1, 2]
    for s in samples:
        assert s.anchors.shape == (7,) and s.negatives.shape == (7, 5)
        assert flat_valid[s.anchors, s.cls].all() and (flat_probs[s.anchors, s.cls] < 0.5).all()
        neg = s.negatives.reshape(-1)
        assert (~flat_valid[neg, s.cls]).all() and flat_valid[neg].any(dim=1).all()
    capped = sample_cps(valid, probs, threshold=0.5, num_anchors=3, num_negatives=1000, with_replacement=False)
    for s in capped:
        n_neg = int((flat_valid.any(1) & ~flat_valid[:, s.cls]).sum())
        assert s.anchors.numel() <= 3 and s.anchors.unique().numel() == s.anchors.numel()
        assert s.negatives.shape == (1, n_neg) and s.negatives.unique().numel() == n_neg
    # No anchors for a class whose student probability is confident everywhere.
    probs[:, 0] = 1.0
    assert 0 not in [s.cls for s in sample_cps(valid, probs, 0.5, 4, 4)]
    # The loss reaches the features, and P only when the caller passes it with its gradient.
    rep = torch.randn(B, 6, *shape, requires_grad=True)
    protos = torch.randn(C, 4, 6, requires_grad=True)
    voxels = rep.permute(0, 2, 3, 4, 1).reshape(-1, 6)
    assert torch.equal(gather_voxels(rep, samples[0].anchors), voxels[samples[0].anchors])
    loss = cps_loss(rep, valid, samples, positive_prototypes(protos, "prototypes"), 0.6, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and rep.grad.abs().sum() > 0 and protos.grad.abs().sum() > 0  # type: ignore[union-attr]
    assert cps_loss(rep, valid, [], None, 0.6, 0.5) == 0


def test_config_validation_names_the_field(phantom_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tau_w"):
        CRLNConfig(tau_w=0.98)
    with pytest.raises(ValueError, match="num_prototypes"):
        CRLNConfig(num_prototypes=0)
    with pytest.raises(ValueError, match="rectify"):
        CRLNConfig(rectify="v9")
    with pytest.raises(ValueError, match="cps_positive"):
        CRLNConfig(dim=False)
    with pytest.raises(CrlnError, match="tau_w"):
        load_config("demo", tiny_overrides(phantom_root, tmp_path, **{"method.name": "crln", "method.tau_w": 0.99}))
    for preset in ("la_crln", "la_cpu_crln"):
        assert load_config(preset).method.name == "crln"


@pytest.mark.parametrize(
    "overrides",
    [
        {"dim": False, "cps_positive": "mean"},
        {"rectify": "fixed_v1"},
        {"rectify": "learnable_v2", "mu_step_input": "current"},
        {"rectify_space": "probs", "mu_param": "sigmoid", "mu_init": 0.5, "unsup_loss": "masked"},
        {"cross_class": False, "spatial_awareness": False, "cps_positive": "prototype"},
        {"cps": False, "conv_integration": False},
        # CPS on, so the "features" reduce shapes the projection; 6 prototypes, not the VNet's 16 quarter
        # channels, so the check tells the two reduces apart. xi_random under the default "mixed" positive,
        # the only one where ξ enters the loss ("prototype" replaces it by ∞).
        {"cps_prototype_reduce": "features", "num_prototypes": 6, "xi_random": True},
        {"cps_prototype_source": "student", "cps_unit_mix": False, "cps_with_replacement": False},
        {"separate_forward": True, "unsup_loss": "weighted", "sa_bn_relu": False},
    ],
)
def test_ablation_variants_train_one_step(overrides: dict[str, object]) -> None:
    method = _crln(3, rectify_start=0, **overrides)
    config = CRLNConfig(**overrides)
    rep_shapes: list[torch.Size] = []
    if method.cps_head is not None:
        method.cps_head.register_forward_hook(lambda _m, _i, output: rep_shapes.append(output.shape))
    out = method.train_step(_batch(3), step=0)
    assert torch.isfinite(out["loss"])
    # each switch removes its term from the step, and only its term
    assert ("loss_cps" in out) == config.cps
    assert ("loss_dim" in out) == config.dim
    assert (method.cps_head is not None) == config.cps
    if config.cps:
        assert rep_shapes, "the CPS head did not run"
        quarter = 4 * 4  # the VNet's quarter-resolution width with n_filters=4
        expected = config.num_prototypes if config.cps_prototype_reduce == "features" else quarter
        assert all(shape[1] == expected for shape in rep_shapes), rep_shapes
        # out["xi"] is a float32 tensor, so compare with a tolerance: 0.6 comes back as 0.6000000238...
        if config.xi_random:
            assert float(out["xi"]) != pytest.approx(CRLNConfig().xi, abs=1e-6)
        else:
            assert float(out["xi"]) == pytest.approx(config.xi, abs=1e-6)
    out["loss"].backward()
    method.after_optimizer_step(0)
    if overrides.get("cps_prototype_source") == "student":
        assert method.student_dim.prototypes.grad is not None  # type: ignore[union-attr]


TELEMETRY = (
    "loss",
    "saturated_fraction",
    "loss_sup",
    "loss_dim",
    "loss_unsup",
    "loss_cps",
    "loss_rect",
    "mu",
    "reliable_fraction",
    "reliable_before",
    "reliable_after",
    "rectified",
    "dice_all_before",
    "dice_all_after",
    "dice_reliable_before",
    "dice_reliable_after",
)


def _overrides(phantom_root: Path, tmp_path: Path, **extra: object) -> list[str]:
    values = {
        "method.name": "crln",
        "method.rectify_start": 2,
        "data.patch_size": "[32,32,16]",
        "data.validation": 0,
        **extra,
    }
    return tiny_overrides(phantom_root, tmp_path, **values)


def test_short_crln_run_lowers_loss_and_logs_telemetry(phantom_root: Path, tmp_path: Path) -> None:
    from crln.engine.trainer import train

    config = load_config(
        "demo",
        _overrides(
            phantom_root,
            tmp_path,
            **{"train.iterations": 12, "optim.lr": 0.05, "method.mu_lr": 0.5, "method.mu_init": 0.5},
        ),
    )
    run = train(config, progress=False).run_dir
    records = [r for r in read_log(run / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(2, 13, 2))
    for key in TELEMETRY:
        assert all(key in r for r in records), key
    assert records[0]["rectified"] == 0.0 and records[-1]["rectified"] == 1.0
    assert records[-1]["mu"] != records[0]["mu"]  # from 0.5 (interior), so any gradient moves it
    first = records[0]["loss_sup"] + records[0]["loss_dim"]
    last = records[-1]["loss_sup"] + records[-1]["loss_dim"]
    assert last < first and records[-1]["loss"] < records[0]["loss"], (records[0], records[-1])


def test_crln_resume_is_exact(phantom_root: Path, tmp_path: Path) -> None:
    import crln.engine.trainer as trainer_module

    overrides = _overrides(phantom_root, tmp_path, **{"train.iterations": 6, "method.mu_lr": 0.5})
    straight = trainer_module.train(load_config("demo", [*overrides, "train.tag=straight"]), progress=False).run_dir
    config = load_config("demo", [*overrides, "train.tag=resumed"])
    train_interrupted(config, 3)
    # As a checkpoint written before μ's optimiser came from configure_optimizers: no "extra_optimizers".
    latest = RunFolder.for_config(config).checkpoint("latest")
    state = load_checkpoint(latest)
    assert state["step"] == 3 and set(state.pop("extra_optimizers")) == {"mu"}
    save_checkpoint(latest, state)
    resumed = trainer_module.train(config, resume=True, progress=False).run_dir
    a = load_checkpoint(straight / "checkpoint_final.pt")["method_state"]
    b = load_checkpoint(resumed / "checkpoint_final.pt")["method_state"]
    assert a.keys() == b.keys() and "rect_momentum_0" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a = [r for r in read_log(straight / "log.jsonl") if "loss" in r]
    log_b = [r for r in read_log(resumed / "log.jsonl") if "loss" in r]
    assert log_a[-1] | {"seconds_per_iteration": 0, "data_wait_fraction": 0} == log_b[-1] | {
        "seconds_per_iteration": 0,
        "data_wait_fraction": 0,
    }  # the last window is complete in both runs (a resumed run's first window is partial)


# --- issue 16: the option and ablation bugs -----------------------------------------------------


def test_sa_bn_relu_makes_sa_and_sa_ci_different_functions() -> None:
    """Without a non-linearity between SA and CI, both are one linear map R → 1 (Tab. 6 rows SA = SA+CI)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 2, 5, 4, 4, 4, generator=g), torch.randn(2, 2, 5, 4, 4, 4, generator=g)

    def affine_defect(dim: DynamicInteractionModule) -> float:
        dim.eval()  # BatchNorm on running statistics: affine on its own, so only the ReLU breaks linearity
        with torch.no_grad():
            f = dim.aggregate
            return float((f(a) + f(b) - f(a + b) - f(torch.zeros_like(a))).abs().max())

    torch.manual_seed(0)
    assert affine_defect(DynamicInteractionModule(2, 5, 16, 8, sa_bn_relu=False)) < 1e-5
    torch.manual_seed(0)
    assert affine_defect(DynamicInteractionModule(2, 5, 16, 8)) > 1e-3


def test_mu_sigmoid_starts_where_it_can_move() -> None:
    with pytest.raises(ValueError, match=r"mu_init must be in \[0.01, 0.99\] with mu_param=sigmoid"):
        CRLNConfig(mu_param="sigmoid", mu_init=0.0)
    with pytest.raises(ValueError, match="mu_init must be in"):
        Rectifier("learnable_v3", 2, mu_param="sigmoid", mu_init=0.0)
    method = _crln(mu_param="sigmoid", mu_init=0.05, mu_lr=1.0, rectify_start=0, mu_step_input="current")
    rectifier = method.rectifier
    assert rectifier is not None and float(rectifier.mu().detach()) == pytest.approx(0.05)  # type: ignore[union-attr]
    for step in range(3):
        method.train_step(_batch(), step)
        _after_step(method, step)
    assert abs(float(rectifier.mu().detach()) - 0.05) > 1e-4  # type: ignore[union-attr]


def test_weighted_nonzero_averages_over_unsaturated_voxels_like_the_code() -> None:
    from crln.methods.crln import saturated_fraction, weighted_nll

    pseudo = torch.zeros(2, 2, 2, 2, 1)
    pseudo[:, 1] = 1.0  # every voxel confidently class 1: per-sample weight 1
    pseudo[1, :, 0, 0, 0] = torch.tensor([0.5, 0.5])  # one unconfident voxel: sample 1 weight 3/4
    logits = torch.zeros(2, 2, 2, 2, 1)
    logits[0, 1] = 100.0  # sample 0 saturated: NLL exactly 0 in fp32
    nll = torch.nn.functional.cross_entropy(logits, pseudo.argmax(1), reduction="none")
    assert float(saturated_fraction(logits, pseudo)) == 0.5
    weights = torch.tensor([1.0, 0.75]).view(2, 1, 1, 1)
    mean_all, reliable = weighted_nll(logits, pseudo, 0.97)
    nonzero, _ = weighted_nll(logits, pseudo, 0.97, nonzero_only=True)
    assert float(reliable) == pytest.approx(7 / 8)
    assert float(mean_all) == pytest.approx(float((nll * weights).mean()))
    assert float(nonzero) == pytest.approx(float((nll * weights)[1].mean()))  # only sample 1's voxels count
    assert float(nonzero) == pytest.approx(2 * float(mean_all))


def test_cps_positive_prototype_part_trains_with_the_papers_mean_not_the_codes(
    phantom_root: Path, tmp_path: Path
) -> None:
    """The DIM's LayerNorm over F gives P a zero-mean gradient over F: the code's mean over F never moves,
    the paper's mean over the R prototypes does."""
    from crln.engine.trainer import train

    # No weight decay: it would shrink every component of P, the feature-mean included.
    values = {"train.iterations": 4, "optim.lr": 0.5, "optim.weight_decay": 0, "method.rectify_start": 0}
    config = load_config("demo", _overrides(phantom_root, tmp_path, **values))
    result = train(config, progress=False)
    torch.manual_seed(config.train.seed)
    start = build_method(config.method, lambda: VNet(num_classes=2, n_filters=4), 2)
    before = start.student_dim.prototypes.detach()  # type: ignore[union-attr]
    after = result.method.student_dim.prototypes.detach()  # type: ignore[union-attr]
    assert before.shape == after.shape and not torch.equal(before, after)
    paper = positive_prototypes(after, "prototypes") - positive_prototypes(before, "prototypes")
    code = positive_prototypes(after, "features") - positive_prototypes(before, "features")
    assert float(paper.abs().max()) > 1e-4
    assert float(code.abs().max()) < 1e-6


def test_separate_forward_gives_each_stream_its_own_batchnorm_statistics() -> None:
    from crln.methods.mean_teacher import MeanTeacher, MeanTeacherConfig

    torch.manual_seed(0)
    method = build_method(MeanTeacherConfig(separate_forward=True), lambda: VNet(num_classes=2, n_filters=4), 2)
    assert isinstance(method, MeanTeacher)
    method.train()
    batch = _batch()
    labeled, strong = batch.labeled_image, batch.unlabeled_image
    assert strong is not None
    with torch.no_grad():
        separate = method.student_forward(labeled, strong)
        assert torch.equal(separate[:2], method.student(labeled)) and torch.equal(separate[2:], method.student(strong))
        method.config.separate_forward = False  # type: ignore[attr-defined]
        joint = method.student_forward(labeled, strong)
    assert joint.shape == separate.shape and not torch.allclose(joint, separate)  # shared batch statistics


def test_inference_networks_and_the_authors_rectified_teacher() -> None:
    from crln.methods.crln import RectifiedNetwork

    method = _crln(mu_init=0.25).eval()
    x = _batch().labeled_image
    assert method.inference_network("student") is method.student
    assert method.inference_network("teacher") is method.teacher
    rectified = method.inference_network("teacher_rectified")
    assert isinstance(rectified, RectifiedNetwork)
    with torch.no_grad():
        logits, feats = method.teacher(x, return_features=True)
        m = method.teacher_dim(feats["quarter"], feats["half"])  # type: ignore[misc]
        assert torch.allclose(rectified(x), logits + 0.75 * m)  # ȳ + (1 − μ)·M(x), μ = 0.25
    with pytest.raises(CrlnError, match="available: student, teacher, teacher_rectified"):
        method.inference_network("ensemble")
    with pytest.raises(CrlnError, match=r"needs method\.dim=true"):
        _crln(dim=False, cps_positive="mean").inference_network("teacher_rectified")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method.name=supervised", "eval.network=teacher"], "one of student for supervised"),
        (["method.name=mean_teacher", "eval.network=teacher_rectified"], "one of student, teacher for mean_teacher"),
        (
            ["method.name=crln", "method.dim=false", "method.cps_positive=mean", "eval.network=teacher_rectified"],
            "dim=false",
        ),
    ],
)
def test_eval_network_is_checked_with_the_config(
    phantom_root: Path, tmp_path: Path, overrides: list[str], fragment: str
) -> None:
    with pytest.raises(CrlnError, match=f"eval.network.*{fragment}"):
        load_config("demo", [*tiny_overrides(phantom_root, tmp_path), *overrides])


def test_rectified_teacher_validates_evaluates_and_is_recorded(phantom_root: Path, tmp_path: Path) -> None:
    from crln.engine.trainer import train
    from crln.evaluation import evaluate

    values = {"train.iterations": 2, "data.validation": 1, "eval.network": "teacher_rectified"}
    config = load_config("demo", _overrides(phantom_root, tmp_path, **values))
    run = train(config, progress=False).run_dir
    result = evaluate(run, limit=1, progress=False)
    assert result["summary"]["network"] == "teacher_rectified"
    assert 0.0 <= result["summary"]["metrics"]["dice"]["mean"] <= 1.0
