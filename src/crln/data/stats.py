"""Per-case intensity statistics of a dataset: what the network is fed, case by case.

A network trained on a few labelled cases with BatchNorm fails on cases whose intensities lie outside
theirs (the LA h5 crops, z-scored over the whole scan before the crop, have means 0.05–1.9; the darkest
collapse to an empty prediction). ``crln data stats`` shows that spread before a run, and whether
``data.intensity=zscore`` is worth trying.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from crln.data.sources import CaseSource
from crln.errors import CrlnError

__all__ = [
    "CaseIntensity",
    "case_intensities",
    "format_intensity_table",
    "is_zscored",
    "split_ids",
    "spread_sentence",
]

ZSCORED_TOLERANCE = 0.05  # |mean| and |std - 1| below this: the case is already z-scored


@dataclass(frozen=True)
class CaseIntensity:
    """Intensity statistics of one case's first channel (all voxels); foreground = label > 0."""

    case: str
    shape: tuple[int, ...]
    mean: float
    std: float
    p1: float
    p99: float
    foreground_fraction: float | None = None
    foreground_mean: float | None = None
    background_mean: float | None = None

    @property
    def contrast(self) -> float | None:
        """Foreground mean minus background mean, in units of the case's std (unchanged by a z-score)."""
        if self.foreground_mean is None or self.background_mean is None or self.std == 0:
            return None
        return (self.foreground_mean - self.background_mean) / self.std


def _one_case(case_id: str, image: np.ndarray, label: np.ndarray | None) -> CaseIntensity:
    """``image``: ``(H, W, D)`` or ``(C, H, W, D)`` (first channel used); ``label``: ``(H, W, D)`` or None."""
    volume = (image[0] if image.ndim == 4 else image).astype(np.float64, copy=False)
    p1, p99 = np.percentile(volume, [1, 99])
    stats = CaseIntensity(case_id, tuple(image.shape), float(volume.mean()), float(volume.std()), float(p1), float(p99))
    foreground = None if label is None else label > 0
    if foreground is None or not foreground.any() or foreground.all():
        return stats
    return replace(
        stats,
        foreground_fraction=float(foreground.mean()),
        foreground_mean=float(volume[foreground].mean()),
        background_mean=float(volume[~foreground].mean()),
    )


def split_ids(dataset: CaseSource, root: str, splits: Sequence[str]) -> tuple[list[str], set[str]]:
    """The ids of ``splits`` in order, and those of them that have no label to read.

    Raises:
        CrlnError: a split without a case list (the dataset says), or with an empty one.
    """
    ids: list[str] = []
    unlabelled: set[str] = set()
    labeled_ids = getattr(dataset, "labeled_ids", None)  # NIfTI: a training image without a label file is unlabelled
    for split in splits:
        found = dataset.ids(split)
        if not found:
            raise CrlnError(f"{root}: split {split!r} holds no case, expected at least one")
        ids += [case_id for case_id in found if case_id not in ids]
        if labeled_ids is not None:
            unlabelled |= set(found) - set(labeled_ids(split))
    return ids, unlabelled


def case_intensities(dataset: CaseSource, ids: list[str], unlabelled: Collection[str] = ()) -> Iterator[CaseIntensity]:
    """The statistics of each case of ``ids`` (without the label columns for ``unlabelled``), read one at a time
    (a large dataset never sits in memory)."""
    for case_id in ids:
        (case,) = dataset.load_many([case_id], with_label=case_id not in unlabelled)
        yield _one_case(case_id, case.image, case.label)


def is_zscored(rows: list[CaseIntensity]) -> bool:
    """Every case has mean ~0 and std ~1 (within :data:`ZSCORED_TOLERANCE`)."""
    return all(abs(r.mean) < ZSCORED_TOLERANCE and abs(r.std - 1) < ZSCORED_TOLERANCE for r in rows)


def spread_sentence(rows: list[CaseIntensity]) -> str:
    """One line: the range of the case means and stds, and whether the cases are z-scored one by one."""
    means, stds = [r.mean for r in rows], [r.std for r in rows]
    ranges = f"{len(rows)} cases: means {min(means):.3g} to {max(means):.3g}, stds {min(stds):.3g} to {max(stds):.3g}"
    if is_zscored(rows):
        return f"{ranges}: every case is z-scored already."
    return (
        f"{ranges}: the cases are not z-scored one by one; if the darkest or faintest cases are the ones a "
        "model fails on, try data.intensity=zscore (compare on the validation split)."
    )


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def format_intensity_table(rows: list[CaseIntensity]) -> str:
    """A Markdown table, one line per case sorted by mean (darkest first), then :func:`spread_sentence`."""
    lines = [
        "| case | shape | mean | std | p1 | p99 | foreground % | foreground mean | background mean | contrast (std) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.mean):
        fraction = None if r.foreground_fraction is None else 100 * r.foreground_fraction
        values = asdict(r)
        cells = [_cell(values[k]) for k in ("mean", "std", "p1", "p99")]
        cells += [_cell(fraction), _cell(r.foreground_mean), _cell(r.background_mean), _cell(r.contrast)]
        lines.append(f"| {r.case} | {'×'.join(map(str, r.shape))} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", spread_sentence(rows)])
