"""Deterministic two-stream (labelled + unlabelled) training data.

Every random choice is a pure function of ``(seed, step, slot)`` or ``(seed, stream, epoch)``, so a
run resumed at step k sees exactly the batches of a straight run, whatever the number of workers:

- :class:`TwoStreamBatchSampler` yields, for each step, keys ``(step, slot, case_index, is_labeled)``;
  with several processes (``torchrun``), process ``rank`` gets its disjoint share of the global
  batch, with the global slots, so N processes see exactly the patches one process would see with
  an N times larger batch;
- :class:`PatchDataset` turns one key into one augmented patch, drawing from
  ``np.random.default_rng([seed, step, slot])``;
- :func:`collate_two_stream` stacks the patches into a :class:`Batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from crln.data.batch import Batch
from crln.data.case import Case
from crln.data.transforms import AugmentConfig, gaussian_noise, random_brightness, random_crop, random_rot_flip
from crln.errors import CrlnError

__all__ = [
    "PatchDataset",
    "TwoStreamBatchSampler",
    "collate_two_stream",
    "make_train_loader",
]

Key = tuple[int, int, int, bool]
_LABELED_STREAM, _UNLABELED_STREAM = 0, 1


class _EpochStream:
    """An endless walk over ``indices``: epoch e is a permutation, a pure function of (seed, stream, e).

    Each epoch yields ``len // batch`` whole batches (the tail is dropped, as the field's grouper
    does), so no case repeats within a batch; a set smaller than the batch fills one batch per epoch
    from successive permutations (repeats unavoidable then).
    """

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int, stream: int) -> None:
        self.indices = np.asarray(list(indices), dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        n = len(self.indices)
        self.per_epoch = max(n // batch_size, 1) if batch_size > 0 and n > 0 else 0
        self._cache: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.indices)
        reps = -(-self.batch_size // n) if n < self.batch_size else 1
        order = np.concatenate(
            [np.random.default_rng([self.seed, self.stream, epoch, r]).permutation(n) for r in range(reps)]
        )
        self._cache = (epoch, order)
        return order

    def batch(self, step: int) -> list[int]:
        if self.batch_size == 0:
            return []
        epoch, b = divmod(step, self.per_epoch)
        order = self._perm(epoch)
        return self.indices[order[b * self.batch_size : (b + 1) * self.batch_size]].tolist()


class TwoStreamBatchSampler(Sampler[list[Key]]):
    """Yields, for steps ``start_step .. num_steps - 1``, the keys ``(step, slot, case_index, is_labeled)``.

    Slots ``0 .. Bl-1`` are labelled, ``Bl .. Bl+Bu-1`` unlabelled. Each stream walks a fresh
    permutation of its own set per epoch (a pure function of ``(seed, epoch)``), so the batch of step s
    does not depend on ``start_step``. ``unlabeled_batch_size = 0`` gives a supervised sampler.

    Data parallel: the batch sizes are per process. With ``world_size`` N the streams draw global
    batches of ``N·Bl`` and ``N·Bu`` cases, and process ``rank`` keeps labelled slots
    ``rank·Bl .. (rank+1)·Bl-1`` and unlabelled slots ``N·Bl + rank·Bu ..``: disjoint shares, a pure
    function of ``(seed, step, rank, N)``, whose union is the batch of one process with the global
    batch sizes (same cases, same slots, hence the same augmentation).
    """

    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        labeled_batch_size: int,
        unlabeled_batch_size: int,
        seed: int,
        start_step: int = 0,
        num_steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_steps is None:
            raise ValueError("num_steps is required")
        if world_size < 1 or not 0 <= rank < world_size:
            raise CrlnError(f"rank = {rank}, world_size = {world_size}: expected 0 <= rank < world_size")
        if labeled_batch_size < 1:
            raise CrlnError(f"labeled_batch_size = {labeled_batch_size}, expected at least 1")
        if unlabeled_batch_size < 0:
            raise CrlnError(f"unlabeled_batch_size = {unlabeled_batch_size}, expected 0 or more")
        if len(labeled_indices) == 0:
            raise CrlnError("no labelled cases, expected at least 1")
        if unlabeled_batch_size > 0 and len(unlabeled_indices) == 0:
            raise CrlnError(f"unlabeled_batch_size = {unlabeled_batch_size} but there are no unlabelled cases")
        if not 0 <= start_step <= num_steps:
            raise CrlnError(f"start_step = {start_step}, expected within [0, num_steps = {num_steps}]")
        self.labeled_batch_size = labeled_batch_size
        self.unlabeled_batch_size = unlabeled_batch_size
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.num_steps = int(num_steps)
        self.rank = int(rank)
        self.world_size = int(world_size)
        global_labeled, global_unlabeled = labeled_batch_size * world_size, unlabeled_batch_size * world_size
        self._labeled = _EpochStream(labeled_indices, global_labeled, self.seed, _LABELED_STREAM)
        self._unlabeled = _EpochStream(unlabeled_indices, global_unlabeled, self.seed, _UNLABELED_STREAM)

    @property
    def steps_per_epoch(self) -> int:
        """Labelled (global) batches per labelled epoch."""
        return self._labeled.per_epoch

    def keys(self, step: int) -> list[Key]:
        """This process's keys of one step (a pure function of the step, the rank and the world size)."""
        bl, bu = self.labeled_batch_size, self.unlabeled_batch_size
        lab_start, unl_start = self.rank * bl, self.rank * bu
        labeled = self._labeled.batch(step)[lab_start : lab_start + bl]
        unlabeled = self._unlabeled.batch(step)[unl_start : unl_start + bu]
        out: list[Key] = [(step, lab_start + j, i, True) for j, i in enumerate(labeled)]
        off = bl * self.world_size + unl_start  # unlabelled slots follow the whole global labelled batch
        out += [(step, off + j, i, False) for j, i in enumerate(unlabeled)]
        return out

    def __iter__(self) -> Iterator[list[Key]]:
        for step in range(self.start_step, self.num_steps):
            yield self.keys(step)

    def __len__(self) -> int:
        return self.num_steps - self.start_step


class PatchDataset(Dataset):
    """Augmented patches of in-memory cases, addressed by sampler keys.

    ``__getitem__((step, slot, case_index, is_labeled))`` draws all randomness from
    ``np.random.default_rng([seed, step, slot])``: rot/flip (on the whole volume, as the field does),
    random crop (padding volumes smaller than the patch), brightness, then Gaussian noise.

    Returns a dict: ``image`` ``(C, h, w, d)`` float32 tensor, ``label`` ``(h, w, d)`` int64 tensor
    (labelled keys only), ``oracle_label`` (unlabelled keys whose case has a label; monitoring only),
    ``is_labeled``, ``step``, ``case_index``.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise CrlnError(f"patch_size = {tuple(patch_size)}, expected three positive sizes (h, w, d)")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.augment = augment if augment is not None else AugmentConfig()
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        step, slot, index, is_labeled = key
        case = self.cases[index]
        rng = np.random.default_rng([self.seed, step, slot])
        image = case.image if case.image.ndim == 4 else case.image[None]
        # Unlabelled cases that do have a label carry it along for oracle monitoring only.
        label = case.label
        if is_labeled and label is None:
            raise CrlnError(f"{case.source or case.case_id}: case used as labelled but has no label")
        if self.augment.rot_flip:
            image, label = random_rot_flip(image, label, rng)
        image, label = random_crop(image, label, self.patch_size, rng)
        image = random_brightness(image, rng, *self.augment.brightness)
        image = gaussian_noise(image, rng, self.augment.noise_sigma, self.augment.noise_clip)
        out: dict[str, Any] = {
            "image": torch.from_numpy(np.array(image, dtype=np.float32, copy=True, order="C")),
            "is_labeled": bool(is_labeled),
            "step": int(step),
            "case_index": int(index),
        }
        if label is not None:
            key_name = "label" if is_labeled else "oracle_label"
            out[key_name] = torch.from_numpy(np.array(label, dtype=np.int64, copy=True, order="C"))
        return out


def collate_two_stream(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack items into a :class:`Batch`, splitting by each item's ``is_labeled`` flag (order kept)."""
    lab = [it for it in items if it["is_labeled"]]
    unl = [it for it in items if not it["is_labeled"]]
    if not lab:
        raise CrlnError("batch holds no labelled item, expected at least 1")
    return Batch(
        labeled_image=torch.stack([it["image"] for it in lab]),
        labeled_label=torch.stack([it["label"] for it in lab]),
        unlabeled_image=torch.stack([it["image"] for it in unl]) if unl else None,
        unlabeled_oracle_label=torch.stack([it["oracle_label"] for it in unl])
        if unl and all("oracle_label" in it for it in unl)
        else None,
        step=int(items[0].get("step", -1)),
        case_indices=[int(it.get("case_index", -1)) for it in lab + unl],
    )


def _worker_init(worker_id: int) -> None:
    # workers decode numpy; more torch threads per worker only oversubscribe the cores
    del worker_id
    torch.set_num_threads(1)


def make_train_loader(
    labeled_cases: Sequence[Case],
    unlabeled_cases: Sequence[Case],
    *,
    patch_size: Sequence[int],
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    start_step: int = 0,
    num_steps: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader yielding ``num_steps - start_step`` :class:`Batch` es, identical for any ``num_workers``.

    Case indices are ``0 .. Nl-1`` for ``labeled_cases`` then ``Nl .. Nl+Nu-1`` for ``unlabeled_cases``.
    The batch sizes are per process; ``rank`` / ``world_size`` select this process's share of the
    global batch (see :class:`TwoStreamBatchSampler`).
    """
    cases = list(labeled_cases) + list(unlabeled_cases)
    n_lab = len(labeled_cases)
    sampler = TwoStreamBatchSampler(
        range(n_lab),
        range(n_lab, len(cases)),
        labeled_batch_size,
        unlabeled_batch_size,
        seed,
        start_step=start_step,
        num_steps=num_steps,
        rank=rank,
        world_size=world_size,
    )
    dataset = PatchDataset(cases, patch_size, augment, seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_two_stream,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
