"""An nnU-Net / MSD folder's ``dataset.json``: classes, channels and file ending, read without torch.

Config checks take ``data.num_classes`` and ``model.in_channels`` from it before any heavy import
(:func:`crln.config.resolve_from_dataset_json`), and :class:`crln.data.nifti.NiftiDataset` reads the
folder with it; both read it here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crln.errors import CrlnError

__all__ = ["DatasetJson"]

#: JSON's names for the Python types ``json.loads`` gives, as a user of the file knows them.
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_LABELS_EXAMPLE = '{"background": 0, "organ": 1}'


def _shown(value: Any) -> str:
    """``array ["T1", "T2"]``: a JSON value as the file holds it, with its JSON type, cut to one short line."""
    text = json.dumps(value)
    return f"{_JSON_TYPES.get(type(value), 'null')} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_index(value: Any) -> bool:
    """A class index as JSON holds one: an integer >= 0 (``true`` is no index, though Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class DatasetJson:
    """The parsed ``dataset.json`` of ``root`` (empty when the folder has none)."""

    root: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, root: str | Path) -> DatasetJson:
        """Read ``root/dataset.json``, every key crln uses checked at once.

        Raises:
            CrlnError: a ``dataset.json`` that is not readable JSON or not a JSON object, or a key of the
                wrong type (``labels``, ``channel_names`` / ``modality``, ``file_ending``), named with the file.
        """
        path = Path(root) / "dataset.json"
        if not path.is_file():
            return cls(Path(root))
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CrlnError(f"{path}: unreadable dataset.json: {str(exc).splitlines()[0]}") from None
        if not isinstance(meta, dict):
            raise CrlnError(f"{path}: top level is {type(meta).__name__}, expected a JSON object")
        parsed = cls(Path(root), meta)
        # Each property checks its key; reading them here names a bad key now, not at some later use.
        _ = parsed.file_ending, parsed.labels, parsed.channel_names
        return parsed

    def _bad_key(self, key: str, expected: str) -> CrlnError:
        return CrlnError(
            f"{self.root / 'dataset.json'}: key {key!r}: expected {expected}, got {_shown(self.meta[key])}"
        )

    @property
    def file_ending(self) -> str:
        ending = self.meta.get("file_ending", ".nii.gz")
        if not isinstance(ending, str) or not ending.startswith("."):
            raise self._bad_key("file_ending", 'a string such as ".nii.gz"')
        return ending

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> index (nnU-Net v2 ``{"background": 0}`` or MSD ``{"0": "background"}``)."""
        labels = self.meta.get("labels", {})
        if not isinstance(labels, dict):
            raise self._bad_key("labels", f"an object such as {_LABELS_EXAMPLE}")
        if "ignore" in labels:  # it would count as one more class, trained towards and scored
            raise CrlnError(
                f"{self.root / 'dataset.json'}: key 'labels' has 'ignore' (nnU-Net's unannotated voxels), which "
                "crln does not support; expected dense labels, every voxel a class"
            )
        out: dict[str, int] = {}
        for k, v in labels.items():
            if _is_index(v):
                out[k] = v
            elif k.isdigit() and isinstance(v, str):  # MSD: index -> name
                out[v] = int(k)
            elif isinstance(v, list) and v and all(_is_index(i) for i in v):  # nnU-Net regions: the first index
                out[k] = v[0]
            else:
                raise CrlnError(
                    f"{self.root / 'dataset.json'}: key 'labels' entry {k!r}: expected a class index >= 0 "
                    f"(or a list of them: nnU-Net regions) as in {_LABELS_EXAMPLE}, got {_shown(v)}"
                )
        return out

    @property
    def num_classes(self) -> int | None:
        """Number of classes (``None`` when unknown)."""
        labels = self.labels
        return max(labels.values()) + 1 if labels else None

    @property
    def channel_names(self) -> dict[str, str]:
        """Channel index -> name (``channel_names`` or MSD ``modality``)."""
        key = "channel_names" if "channel_names" in self.meta else "modality"
        names = self.meta.get(key, {})
        if not isinstance(names, dict):  # a list would give a wrong channel count if it were accepted
            raise self._bad_key(key, 'an object such as {"0": "MRI"} (one entry per channel)')
        return {str(k): str(v) for k, v in names.items()}

    @property
    def num_channels(self) -> int | None:
        """Number of input channels (``None`` when unknown)."""
        return len(self.channel_names) or None
