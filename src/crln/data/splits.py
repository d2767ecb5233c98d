"""Labelled / unlabelled / validation split of a training list, the field's way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crln.errors import CrlnError

__all__ = ["Split", "plan_split", "split_difference", "split_train", "with_validation_list"]


@dataclass(frozen=True)
class Split:
    """Ids of the three training streams (disjoint, in list order)."""

    labeled: list[str]
    unlabeled: list[str]
    validation: list[str]


def split_train(train_ids: Sequence[str], *, labeled: int, validation: int = 0, pool: str = "") -> Split:
    """Split ``train_ids``: the first ``labeled`` ids are labelled (field convention), the LAST
    ``validation`` ids validate, the rest are unlabelled.

    Taking validation from the end keeps the labelled set the same whatever the validation size.

    Raises:
        CrlnError: ``labeled < 1``, ``validation < 0`` or ``labeled + validation`` above the id count
            (``pool`` words what is available, default "the training list holds only N").
    """
    ids = list(train_ids)
    if labeled < 1:
        raise CrlnError(f"labeled = {labeled}, expected at least 1 labelled case")
    if validation < 0:
        raise CrlnError(f"validation = {validation}, expected 0 or more cases")
    if labeled + validation > len(ids):
        raise CrlnError(
            f"config keys data.labeled, data.validation: labeled ({labeled}) + validation ({validation}) = "
            f"{labeled + validation} cases requested, but {pool or f'the training list holds only {len(ids)}'}"
        )
    cut = len(ids) - validation
    return Split(labeled=ids[:labeled], unlabeled=ids[labeled:cut], validation=ids[cut:])


def with_validation_list(split: Split, validation_ids: Sequence[str], list_name: str) -> Split:
    """``split`` validated on a case list of its own (e.g. BraTS19's ``val.txt``) instead of held-out training cases.

    Raises:
        CrlnError: the list is empty or shares ids with the training list.
    """
    ids = list(validation_ids)
    if not ids:
        raise CrlnError(f"config key data.val_split: case list {list_name!r} is empty, expected validation ids")
    train_ids = {*split.labeled, *split.unlabeled, *split.validation}
    shared = [c for c in ids if c in train_ids]
    if shared:
        raise CrlnError(
            f"config key data.val_split: case list {list_name!r} shares {len(shared)} ids with the training list "
            f"(e.g. {shared[0]!r}), expected disjoint lists"
        )
    return Split(labeled=list(split.labeled), unlabeled=[*split.unlabeled, *split.validation], validation=ids)


def _shown(ids: Sequence[str], limit: int = 6) -> str:
    if not ids:
        return "none"
    return ", ".join(ids[:limit]) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def split_difference(recorded: Mapping[str, Sequence[str]], split: Split) -> str | None:
    """How ``split`` differs from the case lists ``recorded`` by role (a run's ``meta.json`` ``split``), in
    words for the user, e.g. ``validation cases: case_009 instead of case_004``; ``None`` when they agree."""
    for role, word in (("labeled", "labelled"), ("validation", "validation"), ("unlabeled", "unlabelled")):
        was, now = list(recorded.get(role, [])), getattr(split, role)
        if was == now:
            continue
        gone, came = [c for c in was if c not in now], [c for c in now if c not in was]
        if came and gone:
            change = f"{_shown(came)} instead of {_shown(gone)}"
        else:
            change = f"also {_shown(came)}" if came else f"no longer {_shown(gone)}" if gone else "another order"
        return f"{word} cases: {change}"
    return None


def plan_split(dataset: Any, data: Any) -> tuple[Split, str]:
    """The training split of ``dataset`` under ``data`` (a :class:`crln.config.DataConfig`), and how it was
    chosen, in words for the user.

    A NIfTI folder some of whose ``imagesTr/`` images have no label in ``labelsTr/`` splits by label files:
    the images with one are the labelled pool (its first ``data.labeled`` cases labelled, its last
    ``data.validation`` cases validate, any others train as unlabelled) and the images without one are
    unlabelled. Every other dataset (h5 case lists, fully labelled NIfTI folders) follows the field's
    rule of :func:`split_train` on the training list. The images of a NIfTI folder's optional
    ``imagesUnlabelled/`` join the unlabelled cases. ``data.val_split`` then replaces the validation
    cases by a list of their own.

    Raises:
        CrlnError: too few (labelled) cases for ``data.labeled`` + ``data.validation``, or a bad list.
    """
    ids = dataset.ids(data.train_split)
    labeled_ids = getattr(dataset, "labeled_ids", None)
    pool = labeled_ids(data.train_split) if labeled_ids is not None else ids
    counts = f"data.labeled={data.labeled}, data.validation={data.validation}"
    if len(pool) == len(ids):
        split = split_train(ids, labeled=data.labeled, validation=data.validation)
        rule = f"list {data.train_split!r} ({counts}: the first ids labelled, the last validate, the rest unlabelled)"
    else:
        have = f"{len(pool)} of the {len(ids)} images of {data.train_split!r} have a label file"
        split = split_train(pool, labeled=data.labeled, validation=data.validation, pool=f"only {have}")
        without = [c for c in ids if c not in set(pool)]
        split = Split(split.labeled, [*split.unlabeled, *without], split.validation)
        rule = f"{have} ({counts} of them); the {len(without)} without one are unlabelled"
    extra = getattr(dataset, "unlabeled_ids", list)()  # NIfTI's imagesUnlabelled/
    if extra:
        split = Split(split.labeled, [*split.unlabeled, *extra], split.validation)
        rule += f"; the {len(extra)} images of imagesUnlabelled/ are unlabelled"
    if data.val_split:
        split = with_validation_list(split, dataset.ids(data.val_split), data.val_split)
        rule += f"; validation list {data.val_split!r}"
    lines = [
        f"data: {len(split.labeled)} labelled, {len(split.unlabeled)} unlabelled, {len(split.validation)} validation "
        f"cases; {rule}",
        f"  labelled: {_shown(split.labeled)}",
        f"  unlabelled: {_shown(split.unlabeled)}",
        f"  validation: {_shown(split.validation)}",
    ]
    orphans = getattr(dataset, "orphan_labels", lambda split: [])(data.train_split)
    if orphans:
        lines.append(f"  ignored: {len(orphans)} label file(s) without an image: {_shown([str(p) for p in orphans])}")
    return split, "\n".join(lines)
