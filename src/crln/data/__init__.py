"""Data: readers (h5, NIfTI, compact cache), validation, phantoms, splits, transforms and the two-stream loader."""

from __future__ import annotations

from crln.data.batch import Batch
from crln.data.case import Case
from crln.data.compact import CompactDataset, compact_h5_dataset, merge_compact
from crln.data.h5 import H5Dataset, clear_h5_cache, locate_case, read_case_list, read_h5_case, write_h5_case
from crln.data.loader import PatchDataset, TwoStreamBatchSampler, collate_two_stream, make_train_loader
from crln.data.nifti import NiftiDataset, read_nifti_volume, write_nifti
from crln.data.phantom import make_phantom, write_phantom_h5_dataset, write_phantom_nifti_dataset
from crln.data.prepare import prepare_h5_dataset, resample_image, resample_label
from crln.data.splits import Split, split_train
from crln.data.transforms import AugmentConfig, gaussian_noise, pad_to_size, random_crop, random_rot_flip
from crln.data.validate import validate_case

__all__ = [
    "AugmentConfig",
    "Batch",
    "Case",
    "CompactDataset",
    "H5Dataset",
    "NiftiDataset",
    "PatchDataset",
    "Split",
    "TwoStreamBatchSampler",
    "clear_h5_cache",
    "collate_two_stream",
    "compact_h5_dataset",
    "gaussian_noise",
    "locate_case",
    "make_phantom",
    "make_train_loader",
    "merge_compact",
    "pad_to_size",
    "prepare_h5_dataset",
    "random_crop",
    "random_rot_flip",
    "read_case_list",
    "read_h5_case",
    "read_nifti_volume",
    "resample_image",
    "resample_label",
    "split_train",
    "validate_case",
    "write_h5_case",
    "write_nifti",
    "write_phantom_h5_dataset",
    "write_phantom_nifti_dataset",
]
