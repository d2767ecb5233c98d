"""Two-stream sampler and loader: composition, epoch coverage, resume determinism, worker independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crln.data import (
    AugmentConfig,
    Batch,
    Case,
    PatchDataset,
    TwoStreamBatchSampler,
    collate_two_stream,
    make_train_loader,
)
from crln.errors import CrlnError


def _cases(n: int, offset: int = 0, labeled: bool = True) -> list[Case]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(offset + i)
        shape = (14 + i % 3, 12, 9)
        label = (rng.random(shape) > 0.5).astype(np.uint8)
        image = (label * 10 + rng.normal(0, 0.1, shape)).astype(np.float32)
        out.append(Case(f"c{offset + i}", image, label if labeled else None))
    return out


def test_sampler_composition_and_coverage() -> None:
    lab, unl = list(range(8)), list(range(8, 20))
    sampler = TwoStreamBatchSampler(lab, unl, 2, 3, seed=5, num_steps=40)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40
    for s, keys in enumerate(batches):
        assert [k[1] for k in keys] == [0, 1, 2, 3, 4] and all(k[0] == s for k in keys)
        lk = [k for k in keys if k[3]]
        uk = [k for k in keys if not k[3]]
        assert len(lk) == 2 and all(k[2] in lab for k in lk)
        assert len(uk) == 3 and all(k[2] in unl for k in uk)
        assert len({k[2] for k in lk}) == 2 and len({k[2] for k in uk}) == 3
    # every labelled epoch (4 steps) covers the labelled set exactly once, in a fresh order
    epochs = [[k[2] for s in range(e * 4, e * 4 + 4) for k in batches[s] if k[3]] for e in range(10)]
    assert all(sorted(ep) == lab for ep in epochs)
    assert len({tuple(ep) for ep in epochs}) > 1


def test_sampler_resume_matches_straight_run() -> None:
    straight = list(TwoStreamBatchSampler(range(5), range(5, 12), 2, 2, seed=1, num_steps=30))
    for k in (0, 1, 7, 17, 29, 30):
        resumed = list(TwoStreamBatchSampler(range(5), range(5, 12), 2, 2, seed=1, start_step=k, num_steps=30))
        assert resumed == straight[k:]
    other = list(TwoStreamBatchSampler(range(5), range(5, 12), 2, 2, seed=2, num_steps=30))
    assert other != straight


def test_sampler_supervised_and_small_sets() -> None:
    sup = list(TwoStreamBatchSampler(range(3), [], 2, 0, seed=0, num_steps=5))
    assert all(len(b) == 2 and all(k[3] for k in b) for b in sup)
    tiny = list(TwoStreamBatchSampler([4], [], 3, 0, seed=0, num_steps=2))
    assert [[k[2] for k in b] for b in tiny] == [[4, 4, 4], [4, 4, 4]]


def test_sampler_errors() -> None:
    with pytest.raises(CrlnError, match="unlabeled_batch_size = 2"):
        TwoStreamBatchSampler(range(3), [], 1, 2, seed=0, num_steps=1)
    with pytest.raises(CrlnError, match="labeled_batch_size = 0"):
        TwoStreamBatchSampler(range(3), [], 0, 0, seed=0, num_steps=1)
    with pytest.raises(CrlnError, match="start_step = 5"):
        TwoStreamBatchSampler(range(3), [], 1, 0, seed=0, start_step=5, num_steps=3)


def test_patch_dataset_and_collate() -> None:
    cases = _cases(3) + _cases(2, offset=10, labeled=False)
    ds = PatchDataset(cases, (8, 8, 12), AugmentConfig(rot_flip=True), seed=3)
    a = ds[(4, 0, 1, True)]
    assert a["image"].shape == (1, 8, 8, 12) and a["image"].dtype == torch.float32
    assert a["label"].shape == (8, 8, 12) and a["label"].dtype == torch.int64
    torch.testing.assert_close(a["image"][0] > 5, a["label"] == 1)
    torch.testing.assert_close(ds[(4, 0, 1, True)]["image"], a["image"])  # pure function of the key
    u = ds[(4, 1, 3, False)]
    assert "label" not in u
    # collate splits by flag, not by position
    batch = collate_two_stream([u, a, ds[(4, 2, 0, True)]])
    assert batch.labeled_image.shape == (2, 1, 8, 8, 12) and batch.labeled_label.shape == (2, 8, 8, 12)
    assert batch.unlabeled_image.shape == (1, 1, 8, 8, 12)
    assert batch.case_indices == [1, 0, 3] and batch.step == 4
    with pytest.raises(CrlnError, match="c10: case used as labelled but has no label"):
        ds[(0, 0, 3, True)]


def _collect(num_workers: int, start_step: int = 0) -> list[Batch]:
    loader = make_train_loader(
        _cases(4),
        _cases(5, offset=10, labeled=False),
        patch_size=(8, 8, 8),
        labeled_batch_size=2,
        unlabeled_batch_size=2,
        augment=AugmentConfig(rot_flip=True, noise_sigma=0.1),
        seed=11,
        start_step=start_step,
        num_steps=6,
        num_workers=num_workers,
    )
    return list(loader)


def _same(a: Batch, b: Batch) -> None:
    assert a.step == b.step and a.case_indices == b.case_indices
    torch.testing.assert_close(a.labeled_image, b.labeled_image, rtol=0, atol=0)
    torch.testing.assert_close(a.labeled_label, b.labeled_label, rtol=0, atol=0)
    torch.testing.assert_close(a.unlabeled_image, b.unlabeled_image, rtol=0, atol=0)


def test_loader_workers_and_resume_identical() -> None:
    serial = _collect(0)
    assert len(serial) == 6 and [b.step for b in serial] == list(range(6))
    b0 = serial[0]
    assert b0.labeled_image.shape == (2, 1, 8, 8, 8) and b0.labeled_label.dtype == torch.int64
    assert b0.unlabeled_image.shape == (2, 1, 8, 8, 8)
    for a, b in zip(serial, _collect(2), strict=True):
        _same(a, b)
    for a, b in zip(serial[4:], _collect(0, start_step=4), strict=True):
        _same(a, b)


def test_batch_to_and_supervised_loader() -> None:
    loader = make_train_loader(
        _cases(3), [], patch_size=(6, 6, 6), labeled_batch_size=2, unlabeled_batch_size=0, seed=0, num_steps=2
    )
    batches = list(loader)
    assert len(batches) == 2 and batches[0].unlabeled_image is None
    moved = batches[0].to("cpu")
    assert moved.images.shape == (2, 1, 6, 6, 6)
