"""Labelled / unlabelled / validation split of a training list, the field's way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crln.errors import CrlnError

__all__ = ["Split", "split_train", "with_validation_list"]


@dataclass(frozen=True)
class Split:
    """Ids of the three training streams (disjoint, in list order)."""

    labeled: list[str]
    unlabeled: list[str]
    validation: list[str]


def split_train(train_ids: Sequence[str], *, labeled: int, validation: int = 0) -> Split:
    """Split ``train_ids``: the first ``labeled`` ids are labelled (field convention), the LAST
    ``validation`` ids validate, the rest are unlabelled.

    Taking validation from the end keeps the labelled set the same whatever the validation size.

    Raises:
        CrlnError: ``labeled < 1``, ``validation < 0`` or ``labeled + validation`` above the id count.
    """
    ids = list(train_ids)
    if labeled < 1:
        raise CrlnError(f"labeled = {labeled}, expected at least 1 labelled case")
    if validation < 0:
        raise CrlnError(f"validation = {validation}, expected 0 or more cases")
    if labeled + validation > len(ids):
        raise CrlnError(
            f"config keys data.labeled, data.validation: labeled ({labeled}) + validation ({validation}) = "
            f"{labeled + validation} cases requested, but the training list holds only {len(ids)}"
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
