"""Labelled / unlabelled / validation split of a training list, the field's way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crln.errors import CrlnError

__all__ = ["Split", "split_train"]


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
            f"labeled ({labeled}) + validation ({validation}) = {labeled + validation} cases requested, "
            f"but the training list holds only {len(ids)}"
        )
    cut = len(ids) - validation
    return Split(labeled=ids[:labeled], unlabeled=ids[labeled:cut], validation=ids[cut:])
