"""Small synthetic raw datasets in the exact public formats, for the preprocessing tests.

- :func:`write_la_raw`: the 2018 LA challenge (``<ID>/lgemri.nrrd``, ``<ID>/laendo.nrrd`` with 255 = atrium);
- :func:`write_pancreas_raw`: TCIA Pancreas-CT (one DICOM CT series per ``PANCREAS_<n>`` folder, stored
  values with a rescale slope and intercept, files in shuffled order) and the NIfTI labels
  ``label<n>.nii.gz`` stored in another axis order than the CT, with the matching affine;
- :func:`write_brats_raw`: BraTS 2019 (``HGG|LGG/<ID>/<ID>_{flair,t1,seg}.nii.gz``; labels 1, 2, 4).

Each writer returns what the tests need to check the pipelines (ids, spacings, HU values).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

#: Hounsfield units of the synthetic CT's tissues.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_PANCREAS = 100.0
HU_BONE = 1000.0
CT_SLOPE = 2.0
CT_INTERCEPT = -1024.0
BRATS_OUTLIER = 30000.0  # fits int16, far above the other FLAIR intensities


def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def write_la_raw(root: Path, n_cases: int = 3, shape: tuple[int, int, int] = (48, 40, 12)) -> list[str]:
    """``root/Training Set/<ID>/{lgemri,laendo}.nrrd``; the atrium is an off-centre ellipsoid."""
    import nrrd

    ids = []
    for i in range(n_cases):
        rng = np.random.default_rng(i)
        cid = f"LA{i:02d}XYZ"
        centre = np.array([shape[0] * 0.4 + i, shape[1] * 0.55, shape[2] / 2])
        atrium = _ellipsoid(shape, centre, np.array([6.0, 5.0, 3.0]))
        image = rng.normal(60, 10, shape) + 80 * atrium
        header = {
            "space": "left-posterior-superior",
            "space directions": np.diag([0.625, 0.625, 0.625]),
            "space origin": np.array([-100.0, -80.0, 20.0]),
        }
        folder = root / "Training Set" / cid
        folder.mkdir(parents=True)
        nrrd.write(str(folder / "lgemri.nrrd"), np.clip(image, 0, 255).astype(np.uint8), header)
        nrrd.write(str(folder / "laendo.nrrd"), (atrium * 255).astype(np.uint8), header)
        ids.append(cid)
    return ids


def _ct_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU volume ``(x, y, z)`` (air, a fat-and-soft-tissue body, a bone rod) and the pancreas mask."""
    x, y, z = shape
    body = _ellipsoid(shape, np.array([x / 2, y / 2, z / 2]), np.array([x * 0.45, y * 0.4, z * 10.0]))
    hu = np.where(body, HU_SOFT, HU_AIR)
    hu[body & (rng.random(shape) < 0.1)] = HU_FAT
    hu[int(x * 0.45) : int(x * 0.55), int(y * 0.7) : int(y * 0.78), :] = HU_BONE
    pancreas = _ellipsoid(shape, np.array([x * 0.4, y * 0.45, z * 0.5]), np.array([x * 0.15, y * 0.1, z * 0.3]))
    hu[pancreas] = HU_PANCREAS
    return hu, pancreas


def _dicom_slice(pixels: np.ndarray, position: list[float], spacing: tuple[float, float, float], uids: dict):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.Modality = "CT"
    ds.PatientID = uids["patient"]
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (along y), column spacing (along x)
    ds.SliceThickness = spacing[2] * 1.2  # differs from the slice spacing on purpose, as in real series
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = position
    ds.RescaleSlope = CT_SLOPE
    ds.RescaleIntercept = CT_INTERCEPT
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_pancreas_raw(
    root: Path,
    n_cases: int = 2,
    shape: tuple[int, int, int] = (40, 36, 12),
    spacing: tuple[float, float, float] = (0.75, 0.75, 2.5),
) -> dict[str, dict]:
    """``root/Pancreas-CT/PANCREAS_000n/<study>/<series>/*.dcm`` and
    ``root/TCIA_pancreas_labels-02-05-2017/label000n.nii.gz``.

    The CT slices are written under shuffled file names and instance numbers (the reader must sort by
    position). The label is stored flipped in y and in z, and transposed (y, x, z), with the affine that
    says so; the pipeline must reorient it onto the CT grid.

    Returns:
        ``{case id: {"hu": (x, y, z) HU, "pancreas": mask, "spacing": spacing}}``.
    """
    from pydicom.uid import generate_uid

    out = {}
    for i in range(n_cases):
        number = i + 1
        rng = np.random.default_rng(100 + i)
        hu, pancreas = _ct_case(shape, rng)
        stored = np.round((hu - CT_INTERCEPT) / CT_SLOPE)
        uids = {"study": generate_uid(), "series": generate_uid(), "patient": f"PANCREAS_{number:04d}"}
        series = root / "Pancreas-CT" / f"PANCREAS_{number:04d}" / uids["study"][-12:] / uids["series"][-12:]
        series.mkdir(parents=True)
        origin = np.array([-15.0, -12.0, -200.0])
        names = rng.permutation(shape[2])
        for k in range(shape[2]):
            position = [float(origin[0]), float(origin[1]), float(origin[2] + k * spacing[2])]
            ds = _dicom_slice(stored[:, :, k].T, position, spacing, uids)  # pixel rows = y, columns = x
            ds.InstanceNumber = int(shape[2] - k)  # reversed: must not decide the order
            ds.save_as(str(series / f"1-{names[k]:03d}.dcm"), enforce_file_format=True)
        # CT voxel (i, j, k) -> LPS (o + i*sx, o + j*sy, o + k*sz) -> RAS: negate x and y
        ct_affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        ct_affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
        # store the label as (y, x, z) with y and z reversed: label[j', i, k'] = mask[i, ny-1-j', nz-1-k']
        stored_label = np.transpose(pancreas[:, ::-1, ::-1], (1, 0, 2)).astype(np.uint8)
        swap_flip = np.zeros((4, 4))
        swap_flip[0, 1] = 1  # stored axis 1 is CT i
        swap_flip[1, 0] = -1  # stored axis 0 is CT j, reversed
        swap_flip[1, 3] = shape[1] - 1
        swap_flip[2, 2] = -1  # stored axis 2 is CT k, reversed
        swap_flip[2, 3] = shape[2] - 1
        swap_flip[3, 3] = 1
        label_affine = ct_affine @ swap_flip
        labels = root / "TCIA_pancreas_labels-02-05-2017"
        labels.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(stored_label, label_affine), str(labels / f"label{number:04d}.nii.gz"))
        out[f"PANCREAS_{number:04d}"] = {"hu": hu, "pancreas": pancreas, "spacing": spacing}
    return out


def write_brats_raw(root: Path, n_cases: int = 3, shape: tuple[int, int, int] = (40, 44, 36)) -> dict[str, dict]:
    """``root/MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<ID>/<ID>_{flair,t1,seg}.nii.gz``.

    The brain is an ellipsoid of positive FLAIR intensities (background exactly 0) holding a tumour
    of labels 2 (oedema), 1 (necrosis) and 4 (enhancing) and one very bright voxel (clipped).

    Returns:
        ``{case id: {"flair": (x, y, z), "seg": (x, y, z), "brain": mask}}``.
    """
    out = {}
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(n_cases):
        rng = np.random.default_rng(200 + i)
        grade = "HGG" if i % 2 == 0 else "LGG"
        cid = f"BraTS19_TEST_{i:03d}_1"
        centre = np.array(shape) / 2 + np.array([i, -i, 0])
        brain = _ellipsoid(shape, centre, np.array(shape) * np.array([0.35, 0.38, 0.33]))
        tumour_centre = centre + np.array([3.0, 2.0, 1.0])
        oedema = _ellipsoid(shape, tumour_centre, np.array([6.0, 5.0, 5.0])) & brain
        core = _ellipsoid(shape, tumour_centre, np.array([3.0, 3.0, 3.0])) & brain
        enhancing = _ellipsoid(shape, tumour_centre, np.array([1.5, 1.5, 1.5])) & brain
        seg = np.zeros(shape, np.uint8)
        seg[oedema], seg[core], seg[enhancing] = 2, 1, 4
        flair = np.where(brain, rng.normal(300, 30, shape).clip(50, None), 0.0)
        flair[oedema] += 400
        bright = tuple(int(c) for c in centre)
        flair[bright] = BRATS_OUTLIER  # an outlier the percentile clip must remove
        folder = root / "MICCAI_BraTS_2019_Data_Training" / grade / cid
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(flair.astype(np.int16), affine), str(folder / f"{cid}_flair.nii.gz"))
        nib.save(nib.Nifti1Image((flair * 0.5).astype(np.int16), affine), str(folder / f"{cid}_t1.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{cid}_seg.nii.gz"))
        out[cid] = {"flair": flair.astype(np.int16), "seg": seg, "brain": brain}
    return out
