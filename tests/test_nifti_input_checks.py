"""Bad or unusual NIfTI input: refused in one line naming the file or key, or read as its header means.

Covers the NIfTI reader (ids shared by imagesTr/ and imagesTs/, NaN labels, complex and RGB voxels,
spacing from the affine), ``dataset.json`` keys of the wrong type, a folder holding only a test set,
the distance unit of ``summary.json``, the header fields outputs inherit, Tensor input to the
Predictor, and what ``crln predict`` checks before its first inference. Models are untrained
inference-weights files built in a second, no training.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import assert_user_error
from crln.config import load_config
from crln.data import NiftiDataset, read_nifti_volume, write_nifti
from crln.data.nifti import check_scan
from crln.data.phantom import write_phantom_h5_dataset, write_phantom_nifti_dataset
from crln.data_formats import select_format
from crln.dataset_json import DatasetJson
from crln.engine.checkpoint import save_checkpoint
from crln.engine.state import inference_weights
from crln.errors import CrlnError
from crln.evaluation import _scan_groups, evaluate, predict_files
from crln.methods import method_for_run
from crln.predictor import Predictor

SHAPE = (20, 20, 16)


def _image(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _model(path: Path, **overrides: object) -> Path:
    """An untrained, tiny ``model_final.pt`` (patch 16³) for predict and evaluate."""
    torch.manual_seed(0)
    values = {"model.n_filters": 2, "data.patch_size": "[16,16,16]", "eval.stride": "[8,8,8]", **overrides}
    config = load_config(None, [f"{k}={v}" for k, v in values.items()])
    save_checkpoint(path, inference_weights(method_for_run(config).eval(), config, 0))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tmp_path_factory.mktemp("model") / "model_final.pt", **{"data.format": "nifti"})


def _quiet_evaluate(target: Path, **kwargs: object) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate(target, device="cpu", progress=False, **kwargs)["summary"]


# --- the dataset folder ---------------------------------------------------------------------------


def test_a_case_id_in_both_imagesTr_and_imagesTs_is_refused(tmp_path: Path) -> None:
    """Cases are loaded by id: the test split would silently read the training case's files."""
    write_nifti(tmp_path / "imagesTr" / "case1_0000.nii.gz", _image(0, (8, 8, 8)))
    write_nifti(tmp_path / "labelsTr" / "case1.nii.gz", np.zeros((8, 8, 8), np.uint8))
    write_nifti(tmp_path / "imagesTs" / "case1_0000.nii.gz", _image(1, (10, 10, 6)))
    write_nifti(tmp_path / "imagesTs" / "case2_0000.nii.gz", _image(2, (10, 10, 6)))
    ds = NiftiDataset(tmp_path)
    expected = r"imagesTs: case 'case1' is also in imagesTr/, expected distinct case ids"
    for call in (lambda: ds.ids("test"), lambda: ds.ids("train"), lambda: ds.load("case1")):
        with pytest.raises(CrlnError, match=expected):
            call()
    assert ds.load("case2").image.shape == (10, 10, 6)  # an id in one folder only still loads


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_a_float_label_is_refused(tmp_path: Path, bad: float) -> None:
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", _image(0, (8, 8, 8)))
    label = np.zeros((8, 8, 8), np.float32)
    label[2:6, 2:6, 2:6] = 1
    label[3, 3, 3] = bad
    write_nifti(tmp_path / "labelsTr" / "c.nii.gz", label)
    with pytest.raises(CrlnError, match=r"labelsTr/c\.nii\.gz: label has 1 NaN or Inf voxels, expected integer"):
        NiftiDataset(tmp_path).load("c")


@pytest.mark.parametrize(
    "dtype",
    [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])],
    ids=["complex", "rgb"],
)
def test_complex_and_rgb_images_are_refused_naming_the_file(tmp_path: Path, dtype: object) -> None:
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, dtype=dtype), np.eye(4)), str(path))
    expected = r"scan\.nii\.gz: image has dtype .*, expected a real numeric array"
    with pytest.raises(CrlnError, match=expected):
        read_nifti_volume(path)
    with pytest.raises(CrlnError, match=expected):
        check_scan([path])  # from the header alone


def test_a_label_of_complex_voxels_is_refused(tmp_path: Path) -> None:
    write_nifti(tmp_path / "imagesTr" / "c_0000.nii.gz", _image(0, (8, 8, 8)))
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.complex64), np.eye(4)), str(tmp_path / "labelsTr" / "c.nii.gz"))
    with pytest.raises(CrlnError, match=r"c\.nii\.gz: label has dtype complex64, expected a real numeric array"):
        NiftiDataset(tmp_path).load("c")


def test_spacing_is_the_voxel_size_of_the_affine_not_pixdim(tmp_path: Path) -> None:
    """nibabel places voxels with the sform when set; pixdim may say otherwise, and distances follow the affine."""
    header = nib.Nifti1Header()
    header.set_data_shape((16, 16, 8))
    header.set_data_dtype(np.float32)
    header.set_sform(np.diag([0.5, 0.5, 3.0, 1.0]), code=1)
    header.set_qform(None, code=0)
    header["pixdim"][1:4] = 1.0
    nib.save(nib.Nifti1Image(_image(0, (16, 16, 8)), None, header=header), str(tmp_path / "x.nii.gz"))
    assert read_nifti_volume(tmp_path / "x.nii.gz").spacing == pytest.approx((0.5, 0.5, 3.0))


def test_case_ids_ending_in_four_digits_get_the_naming_hint(tmp_path: Path) -> None:
    """``case_0001.nii.gz`` reads as channel 1 of case 'case' (nnU-Net's naming); the error says how to name it."""
    (tmp_path / "imagesTr").mkdir()
    for i in (1, 2):
        nib.save(nib.Nifti1Image(_image(i), np.eye(4)), str(tmp_path / "imagesTr" / f"case_{i:04d}.nii.gz"))
    with pytest.raises(CrlnError, match=r"case 'case' has channels \[1, 2\].*name it case_0001_0000\.nii\.gz\)$"):
        NiftiDataset(tmp_path).ids("train")


# --- dataset.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "fragment"),
    [
        ({"labels": ["background", "tumour"]}, """key 'labels': expected an object such as {"background": 0"""),
        ({"labels": {"background": 0, "tumour": ["x"]}}, "key 'labels' entry 'tumour': expected a class index"),
        ({"labels": {"background": 0, "tumour": True}}, "key 'labels' entry 'tumour': expected a class index"),
        ({"channel_names": ["T1", "T2"]}, """key 'channel_names': expected an object such as {"0": "MRI"}"""),
        ({"channel_names": "MRI"}, """key 'channel_names': expected an object such as {"0": "MRI"}"""),
        ({"modality": ["T1"]}, "key 'modality': expected an object"),
        ({"file_ending": 5}, """key 'file_ending': expected a string such as ".nii.gz", got number 5"""),
        ({"labels": {"background": 0, "organ": 1, "ignore": 2}}, "key 'labels' has 'ignore'"),
    ],
)
def test_dataset_json_keys_of_the_wrong_type_are_named(tmp_path: Path, meta: dict, fragment: str) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CrlnError) as caught:
        DatasetJson.read(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'dataset.json'}: ") and fragment in str(caught.value)


def test_channel_names_as_a_list_is_one_error_line_of_crln_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A list was read as one channel (in_channels 1) for two declared channels."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"bg": 0, "x": 1}, "channel_names": ["T1", "T2"]}))
    argv = ["config", "demo", "data.format=nifti", f"data.root={tmp_path}"]
    assert_user_error(argv, capsys, "dataset.json: key 'channel_names': expected an object", 'got array ["T1", "T2"]')


def test_msd_and_nnunet_label_forms_still_read(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x"}, "modality": {"0": "CT"}}))
    msd = DatasetJson.read(tmp_path)
    assert msd.labels == {"bg": 0, "x": 1} and msd.num_channels == 1 and msd.file_ending == ".nii.gz"
    regions = {"labels": {"background": 0, "whole": [1, 2], "core": [2]}, "channel_names": {"0": "T1", "1": "T2"}}
    (tmp_path / "dataset.json").write_text(json.dumps(regions))
    nnunet = DatasetJson.read(tmp_path)
    assert nnunet.labels == {"background": 0, "whole": 1, "core": 2} and nnunet.num_channels == 2


# --- crln evaluate --------------------------------------------------------------------------------


def test_evaluate_on_a_folder_holding_only_a_test_set(model: Path, tmp_path: Path) -> None:
    """imagesTs/ + labelsTs/ alone: a held-out test set to evaluate a run on with --data."""
    root = tmp_path / "heldout"
    write_nifti(root / "imagesTs" / "c1_0000.nii.gz", _image())
    label = np.zeros(SHAPE, np.uint8)
    label[5:10, 5:10, 5:10] = 1
    write_nifti(root / "labelsTs" / "c1.nii.gz", label)
    assert select_format(root).name == "nifti"
    summary = _quiet_evaluate(model, data_root=root, out_dir=tmp_path / "eval")
    assert summary["n_cases"] == 1 and summary["split"] == "test"


def test_evaluate_names_a_missing_test_label_before_the_first_inference(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It named the image ('label is missing') once that case was reached, after scoring the cases before it."""
    root = write_phantom_nifti_dataset(tmp_path / "data", n_train=1, n_test=3, shape=SHAPE)
    (root / "labelsTs" / "case_002.nii.gz").unlink()
    monkeypatch.setattr(Predictor, "predict", lambda *a, **k: pytest.fail("inference before the label check"))
    expected = f"{root / 'labelsTs' / 'case_002.nii.gz'}: file not found, expected the label of case 'case_002'"
    with pytest.raises(CrlnError, match=re.escape(expected) + r".*1 of the 3 cases of 'test'"):
        _quiet_evaluate(model, data_root=root, out_dir=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_distance_unit_follows_the_format_not_the_spacing(model: Path, tmp_path: Path) -> None:
    """NIfTI at 1 mm isotropic is in mm; h5 (no spacing stored) is in voxels."""
    nifti = write_phantom_nifti_dataset(tmp_path / "nifti", n_train=1, n_test=1, shape=SHAPE, spacing=(1, 1, 1))
    h5 = write_phantom_h5_dataset(tmp_path / "h5", n_train=1, n_test=1, shape=SHAPE)
    assert _quiet_evaluate(model, data_root=nifti, out_dir=tmp_path / "e1")["distance_unit"] == "mm"
    assert _quiet_evaluate(model, data_root=h5, out_dir=tmp_path / "e2")["distance_unit"] == "voxels"


# --- the Predictor and crln predict ---------------------------------------------------------------


@pytest.mark.parametrize("intensity", ["as_stored", "minmax", "zscore"])
def test_predictor_takes_a_tensor_as_it_takes_an_array(tmp_path: Path, intensity: str) -> None:
    path = _model(tmp_path / "model_final.pt", **{"data.intensity": intensity})
    predictor = Predictor.from_checkpoint(path, device="cpu")
    image = _image() * 100 + 300
    labels, probs = predictor.predict(image)
    tensor_labels, tensor_probs = predictor.predict(torch.from_numpy(image))
    np.testing.assert_array_equal(tensor_labels, labels)
    torch.testing.assert_close(tensor_probs, probs)


def _scan_header() -> nib.Nifti1Header:
    """A scan's header with a display window, an intent, a repetition time and a time unit."""
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    header["cal_min"], header["cal_max"] = -5, 900
    header["pixdim"][4] = 3.0
    header.set_intent("z score")
    return header


def test_outputs_do_not_inherit_the_scans_value_and_time_fields(tmp_path: Path) -> None:
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    write_nifti(tmp_path / "seg.nii.gz", np.ones(SHAPE, np.uint8), affine, _scan_header())
    write_nifti(tmp_path / "prob.nii.gz", np.full((*SHAPE, 2), 0.5, np.float32), affine, _scan_header())
    for name in ("seg.nii.gz", "prob.nii.gz"):
        header = nib.load(tmp_path / name).header
        assert (float(header["cal_min"]), float(header["cal_max"])) == (0.0, 0.0), name
        assert header.get_intent()[0] == "none" and header.get_xyzt_units() == ("mm", "unknown"), name
    assert nib.load(tmp_path / "prob.nii.gz").header.get_zooms() == pytest.approx((0.7, 0.8, 2.5, 1.0))


def test_a_nifti2_scan_gives_nifti2_outputs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A NIfTI-1 image built on a NIfTI-2 header made nibabel print a 'sizeof_hdr' warning."""
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    header = nib.Nifti2Image(_image(), affine).header
    write_nifti(tmp_path / "seg.nii.gz", np.ones(SHAPE, np.uint8), affine, header)
    assert isinstance(nib.load(tmp_path / "seg.nii.gz"), nib.Nifti2Image)
    assert "sizeof_hdr" not in capfd.readouterr().err


def _predict(model: Path, inputs: list[Path], out: Path, **kwargs: object) -> list[Path]:
    with contextlib.redirect_stdout(io.StringIO()):
        return predict_files(model, inputs, out, device="cpu", progress=False, **kwargs)


def test_predict_checks_every_input_before_the_first_inference(model: Path, tmp_path: Path) -> None:
    scans = [tmp_path / f"{name}.nii.gz" for name in ("a", "b", "c")]
    for k, scan in enumerate(scans[:2]):
        write_nifti(scan, _image(k))
    scans[2].write_bytes(b"not a NIfTI file")
    with pytest.raises(CrlnError, match=r"c\.nii\.gz: unreadable NIfTI file"):
        _predict(model, scans, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))  # a and b were not segmented first


def test_predict_checks_every_cases_channel_count_before_the_first_inference(model: Path, tmp_path: Path) -> None:
    """The count was checked case by case once read: a folder with one 2-channel case among 1-channel ones
    was segmented up to it, leaving outputs that a rerun would refuse to replace without --overwrite."""
    folder = tmp_path / "in"
    write_nifti(folder / "a.nii.gz", _image(0))
    for k in (0, 1):
        write_nifti(folder / f"b_000{k}.nii.gz", _image(k))
    write_nifti(folder / "c.nii.gz", np.stack([_image(0), _image(1)], -1))  # MSD: one 4D file
    files = f"{folder / 'b_0000.nii.gz'}, {folder / 'b_0001.nii.gz'}"
    expected = f"{files}: image has 2 channel(s), expected model.in_channels = 1 of the checkpoint's network"
    with pytest.raises(CrlnError, match=re.escape(expected)):
        _predict(model, [folder], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*"))
    with pytest.raises(CrlnError, match=re.escape(f"{folder / 'c.nii.gz'}: image has 2 channel(s)")):
        _predict(model, [folder / "a.nii.gz", folder / "c.nii.gz"], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*"))


def test_two_cases_writing_one_output_name_are_refused(model: Path, tmp_path: Path) -> None:
    """With nnU-Net names, case x_prob's segmentation and case x's probabilities are both x_prob.nii.gz."""
    scans = [tmp_path / "in" / name for name in ("x.nii.gz", "x_prob.nii.gz")]
    for scan in scans:
        write_nifti(scan, _image())
    with pytest.raises(CrlnError, match=r"cases 'x' and 'x_prob' would both write x_prob\.nii\.gz"):
        _predict(model, scans, tmp_path / "out", nnunet_names=True, probabilities=True)
    assert not list((tmp_path / "out").glob("*"))


def test_predict_names_a_cases_missing_last_channel_file(tmp_path: Path) -> None:
    """With the 2-channel network, a case whose second channel file is missing named only its first file."""
    two_channels = _model(tmp_path / "model_final.pt", **{"data.format": "nifti", "model.in_channels": 2})
    folder = tmp_path / "in"
    for k in (0, 1):
        write_nifti(folder / f"a_000{k}.nii.gz", _image(k))
    write_nifti(folder / "b_0000.nii.gz", _image(2))
    expected = f"{folder / 'b_0000.nii.gz'}: image has 1 channel(s), expected model.in_channels = 2 of the "
    with pytest.raises(CrlnError, match=re.escape(expected) + r".*: no b_0001\.nii\.gz beside it$"):
        _predict(two_channels, [folder], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*"))


def test_predict_and_the_dataset_reader_say_the_same_of_a_channel_gap(tmp_path: Path) -> None:
    """crln predict's own grouping said 'has channels [0, 2], expected 0..1'; the reader named the missing file."""
    folder = tmp_path / "imagesTr"
    for k in (0, 2):
        write_nifti(folder / f"c_000{k}.nii.gz", _image(k))
    with pytest.raises(CrlnError) as reader:
        NiftiDataset(tmp_path).ids("train")
    with pytest.raises(CrlnError) as predict:
        _scan_groups([folder])
    assert str(predict.value) == str(reader.value)
    assert str(reader.value).startswith(f"{folder}: case 'c' has channels [0, 2] but no c_0001.nii.gz, expected ")
