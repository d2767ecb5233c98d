"""Bad inputs, as a matrix: every one gives exit code 2, one stderr line naming the file or key and
what was expected, no traceback, and no output files.

The readers are driven through the CLI in-process (``crln.cli.main``): ``evaluate`` reads images
and labels and checks them against the checkpoint's classes, ``predict`` reads unlabelled scans,
``config`` and ``train`` read YAML and options. A tiny untrained checkpoint stands in for a model.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pytest

from conftest import assert_user_error, tiny_overrides
from crln.cli import main
from crln.config import config_to_dict, load_config
from crln.data.h5 import write_h5_case
from crln.engine.checkpoint import save_checkpoint
from crln.methods import method_for_run

SHAPE = (32, 32, 32)  # one tiny-config patch: evaluation is a single window
CASE = "bad"


def _permissions_apply() -> bool:
    """Whether a file with mode 000 is unreadable here (not for root with CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_text("x")
        probe.chmod(0)
        try:
            probe.read_text()
        except PermissionError:
            return True
        return False


PERMISSIONS_APPLY = _permissions_apply()


@contextlib.contextmanager
def _unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``path`` unreadable for the code under test, for every user.

    Mode 000 where the OS enforces it; as root (CI runs as root, which reads any mode) the readers the
    code uses on that path, ``Path.open`` and ``Path.read_text``, raise the error the OS would give, so
    the test still runs instead of skipping.
    """
    if PERMISSIONS_APPLY:
        path.chmod(0)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    target = path.resolve()
    real_open, real_read_text = Path.open, Path.read_text

    def refuse(self: Path) -> None:
        if self.resolve() == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))

    def fake_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        refuse(self)
        return real_open(self, *args, **kwargs)

    def fake_read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        refuse(self)
        return real_read_text(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", fake_open)
        patch.setattr(Path, "read_text", fake_read_text)
        yield


def _image(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _label(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[8:20, 8:20, 8:20] = 1
    return label


@pytest.fixture(scope="module")
def checkpoint(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny supervised checkpoint (2 classes, 1 input channel, patch 32³)."""
    folder = tmp_path_factory.mktemp("model")
    config = load_config("demo", tiny_overrides(phantom_root, folder / "runs"))
    method = method_for_run(config)
    path = folder / "model.pt"
    state = {"method": config.method.name, "config": config_to_dict(config), "step": 0}
    save_checkpoint(path, {**state, "method_state": method.state_dict()})
    return path


# ----------------------------------------------------------------------------------------------------------
# h5 case files


def _h5(path: Path, **datasets: object) -> None:
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value)


def _truncated_h5(path: Path) -> None:
    write_h5_case(path, _image(), _label())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _with_voxel(value: float) -> np.ndarray:
    image = _image()
    image[3, 4, 5] = value
    return image


def _label_with(value: int, dtype: type = np.int16) -> np.ndarray:
    label = _label().astype(dtype)
    label[0, 0, 0] = value
    return label


H5_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "zero-byte": (lambda p: p.write_bytes(b""), "empty (0 bytes), expected an HDF5 file"),
    "not-hdf5": (lambda p: p.write_text("image,label\n1,0\n"), "not an HDF5 file"),
    "truncated": (_truncated_h5, "truncated or corrupt"),
    "missing-image-key": (lambda p: _h5(p, label=_label()), "missing key 'image'"),
    "missing-label-key": (lambda p: _h5(p, image=_image()), "missing key 'label'"),
    "image-2d": (lambda p: _h5(p, image=_image((32, 32)), label=_label()), "(2D), expected 3D"),
    "image-4d": (lambda p: _h5(p, image=_image((2, *SHAPE)), label=_label()), "(4D), expected 3D"),
    "image-strings": (lambda p: _h5(p, image=np.full(SHAPE, b"x"), label=_label()), "expected a real numeric"),
    "image-complex": (lambda p: _h5(p, image=_image().astype(np.complex64), label=_label()), "expected a real"),
    "label-strings": (lambda p: _h5(p, image=_image(), label=np.full(SHAPE, b"1")), "expected integer class"),
    "label-fractional": (lambda p: _h5(p, image=_image(), label=np.full(SHAPE, 0.5)), "non-integer"),
    "nan-voxels": (lambda p: _h5(p, image=_with_voxel(np.nan), label=_label()), "1 NaN and 0 Inf voxels"),
    "inf-voxels": (lambda p: _h5(p, image=_with_voxel(-np.inf), label=_label()), "0 NaN and 1 Inf voxels"),
    "label-above-classes": (lambda p: _h5(p, image=_image(), label=_label_with(2)), "[2] outside the expected range"),
    "label-negative": (lambda p: _h5(p, image=_image(), label=_label_with(-1)), "expected class indices in [0, 255]"),
    "label-shape": (lambda p: _h5(p, image=_image(), label=_label((32, 32, 16))), "expected the image's spatial"),
    "empty-axis": (lambda p: _h5(p, image=_image((0, 32, 32)), label=_label((0, 32, 32))), "empty axis"),
    "absurd-intensities": (lambda p: _h5(p, image=_with_voxel(3.2e37), label=_label()), "expected |value| <= 1e+06"),
}


@pytest.mark.parametrize("name", sorted(H5_CASES))
def test_bad_h5_case(name: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write, fragment = H5_CASES[name]
    root = tmp_path / "data"
    root.mkdir()
    (root / "test.list").write_text(f"{CASE}\n")
    write(root / f"{CASE}.h5")
    out = tmp_path / "eval"
    assert_user_error(["evaluate", checkpoint, "--data", root, "--out", out], capsys, f"{CASE}.h5", fragment)
    assert not out.exists()


def _h5_root(tmp_path: Path, ids: list[str], listed: str | None) -> Path:
    root = tmp_path / "data"
    root.mkdir(parents=True)
    for case_id in ids:
        write_h5_case(root / f"{case_id}.h5", _image(), _label(), compression=None)
    if listed is not None:
        (root / "test.list").write_text(listed)
    return root


@pytest.mark.parametrize(
    ("listed", "fragment"),
    [
        ("a\nb\na\n", "test.list: duplicate ids 'a' (lines 1 and 3)"),
        ("ghost\na\n", "case 'ghost' not found"),
        ("a\n../outside\n", "line 2 id '../outside' holds a path separator or '..'"),
        ("# only a comment\n\n", "case list 'test'"),
        (None, "no case list for split 'test'"),
    ],
    ids=["duplicate-id", "missing-id", "escapes-root", "empty-list", "no-list"],
)
def test_bad_case_list(
    listed: str | None, fragment: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _h5_root(tmp_path, ["a", "b"], listed)
    out = tmp_path / "eval"
    assert_user_error(["evaluate", checkpoint, "--data", root, "--out", out], capsys, str(root), fragment)
    assert not out.exists()


def test_symlink_out_of_the_data_root_is_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "elsewhere" / "secret"
    outside.mkdir(parents=True)
    write_h5_case(outside / "scan.h5", _image(), _label())
    root = _h5_root(tmp_path, [], "escaped\n")
    (root / "escaped").symlink_to(outside, target_is_directory=True)
    out = tmp_path / "eval"
    assert_user_error(["evaluate", checkpoint, "--data", root, "--out", out], capsys, "resolves outside the data root")
    assert not out.exists()


@pytest.mark.parametrize("target", ["case", "list"])
def test_unreadable_h5_paths(
    target: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _h5_root(tmp_path, ["a"], "a\n")
    path = root / ("a.h5" if target == "case" else "test.list")
    out = tmp_path / "eval"
    fragment = "cannot read (Permission denied)" if target == "case" else "unreadable: [Errno 13] Permission denied"
    with _unreadable(path, monkeypatch):
        assert_user_error(["evaluate", checkpoint, "--data", root, "--out", out], capsys, path.name, fragment)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# NIfTI (nnU-Net / MSD) folders


def _nii(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def _truncated_nii(path: Path) -> None:
    _nii(path, _image())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_nii(path: Path, array: np.ndarray | None = None) -> None:
    """A .nii.gz with one byte flipped mid-stream: nibabel alone decodes it to garbage without a word."""
    _nii(path, _image() if array is None else array)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _shifted_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = [0.0, 0.0, 5.0]
    return affine


# name: (image writer, label writer, fragment); the writers get the file path
NIFTI_CASES: dict[str, tuple[Callable[[Path], None], Callable[[Path], None] | None, str]] = {
    "zero-byte-image": (lambda p: p.write_bytes(b""), None, "empty (0 bytes), expected a NIfTI volume"),
    "not-nifti": (lambda p: p.write_bytes(gzip.compress(b"not a volume")), None, "unreadable NIfTI file"),
    "truncated": (_truncated_nii, None, "unreadable NIfTI file"),
    "corrupt-mid-stream": (_corrupt_nii, None, "unreadable NIfTI file: corrupt gzip stream (CRC check failed)"),
    "label-corrupt-mid-stream": (None, lambda p: _corrupt_nii(p, _label()), "corrupt gzip stream"),
    "absurd-intensities": (lambda p: _nii(p, _with_voxel(3.2e37)), None, "expected |value| <= 1e+06"),
    "image-2d": (lambda p: _nii(p, _image((32, 32))), None, "(2D), expected 3D"),
    "image-5d": (lambda p: _nii(p, _image((*SHAPE, 2, 2))), None, "(5D), expected 3D"),
    "image-two-channels": (
        lambda p: _nii(p, _image((*SHAPE, 2))),
        None,
        "2 channel(s), expected model.in_channels = 1",
    ),
    "nan-voxels": (lambda p: _nii(p, _with_voxel(np.nan)), None, "1 NaN and 0 Inf voxels"),
    "label-fractional": (None, lambda p: _nii(p, np.full(SHAPE, 0.5, np.float32)), "non-integer"),
    "label-above-classes": (None, lambda p: _nii(p, _label_with(2)), "[2] outside the expected range"),
    "label-negative": (None, lambda p: _nii(p, _label_with(-3)), "expected class indices in [0, 255]"),
    "label-shape": (None, lambda p: _nii(p, _label((32, 32, 16))), "differs from image spatial shape"),
    "label-affine": (None, lambda p: _nii(p, _label(), _shifted_affine()), "affine differs"),
    "label-missing": (None, lambda p: None, "file not found, expected the label of case 'bad'"),
}


@pytest.mark.parametrize("name", sorted(NIFTI_CASES))
def test_bad_nifti_case(name: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image, write_label, fragment = NIFTI_CASES[name]
    root = tmp_path / "nifti"
    image_path = root / "imagesTr" / f"{CASE}_0000.nii.gz"
    label_path = root / "labelsTr" / f"{CASE}.nii.gz"
    image_path.parent.mkdir(parents=True)
    label_path.parent.mkdir(parents=True)
    (write_image or (lambda p: _nii(p, _image())))(image_path)
    (write_label or (lambda p: _nii(p, _label())))(label_path)
    named = label_path if write_label is not None else image_path
    out = tmp_path / "eval"
    argv = ["evaluate", checkpoint, "--data", root, "--split", "train", "--out", out]
    assert_user_error(argv, capsys, named.name, fragment)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# predict: unlabelled scans


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("nan.nii.gz", "1 NaN and 0 Inf voxels"),
        ("corrupt.nii.gz", "corrupt gzip stream (CRC check failed)"),
        ("scan.txt", "expected a .nii.gz, .nii, .h5 or .hdf5 file"),
        ("two_channels.nii.gz", "2 channel(s), expected model.in_channels = 1"),
        ("absent.nii.gz", "no such file"),
    ],
)
def test_bad_predict_input(
    name: str, fragment: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    if name == "nan.nii.gz":
        _nii(path, _with_voxel(np.nan))
    elif name == "corrupt.nii.gz":
        _corrupt_nii(path)
    elif name == "two_channels.nii.gz":
        _nii(path, _image((*SHAPE, 2)))
    elif name == "scan.txt":
        path.write_text("not a scan")
    out = tmp_path / "pred"
    assert_user_error(["predict", checkpoint, path, "-o", out], capsys, name, fragment)
    assert not out.exists()


def test_predict_refuses_inputs_whose_outputs_collide(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder in ("a", "b"):
        _nii(tmp_path / folder / "scan_0000.nii.gz", _image())
    out = tmp_path / "pred"
    argv = ["predict", checkpoint, tmp_path / "a" / "scan_0000.nii.gz", tmp_path / "b" / "scan_0000.nii.gz"]
    assert_user_error([*argv, "-o", out], capsys, "scan_seg.nii.gz would overwrite", "distinct case names")
    assert not out.exists()


def test_constant_images_are_segmented(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A constant image is a valid (if useless) input: no division by its std, no NaN, exit 0."""
    root = tmp_path / "data"
    root.mkdir()
    write_h5_case(root / "flat.h5", np.full(SHAPE, 7.0, np.float32), _label())
    (root / "test.list").write_text("flat\n")
    assert main(["evaluate", str(checkpoint), "--data", str(root), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "summary.json").is_file()
    _nii(tmp_path / "flat.nii.gz", np.zeros(SHAPE, np.float32))
    assert main(["predict", str(checkpoint), str(tmp_path / "flat.nii.gz"), "-o", str(tmp_path / "pred")]) == 0
    seg = np.asarray(nib.load(tmp_path / "pred" / "flat_seg.nii.gz").dataobj)
    assert seg.shape == SHAPE and set(np.unique(seg)) <= {0, 1}
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------
# configs and options


CONFIG_FILES = {
    "invalid-yaml": ("data: [unclosed\n", "invalid YAML at line"),
    "top-level-list": ("- 1\n- 2\n", "expected a mapping at the top level"),
    "unknown-key": ("optim:\n  lrr: 0.1\n", "unknown config key optim.lrr"),
    "wrong-type": ("train:\n  iterations: many\n", "config key train.iterations: expected an integer"),
    "wrong-section-type": ("data: 3\n", "config key data: expected a mapping"),
    "circular-base": ("base: self.yaml\n", "circular base chain"),
    "python-tag": ("data: !!python/object/apply:os.getcwd []\n", "invalid YAML"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_bad_config_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, fragment = CONFIG_FILES[name]
    path = tmp_path / "self.yaml"
    path.write_text(text)
    assert_user_error(["config", path], capsys, fragment)


def test_config_path_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_user_error(["config", tmp_path], capsys, str(tmp_path), "no such file or preset")


def test_unreadable_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    with _unreadable(path, monkeypatch):
        assert_user_error(["config", path], capsys, "locked.yaml", "cannot read (Permission denied)")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"method.name": "crln", "method.confidence_threshold": 0.9, "method.tau_w": 0.9}, "tau_w must be < conf"),
        ({"method.name": "crln", "method.num_prototypes": 0}, "num_prototypes must be an integer >= 1"),
        ({"data.labeled": 50}, "data.labeled, data.validation: labeled (50) + validation (1) = 51 cases"),
        ({"data.patch_size": "[128,128,128]"}, "config key data.patch_size: [128, 128, 128] is larger than every"),
        ({"eval.stride": "[48,48,48]"}, "config key eval.stride: expected at most data.patch_size [32, 32, 32]"),
        ({"data.validation": -1}, "config key data.validation: expected an integer >= 0"),
        ({"train.iterations": 0}, "config key train.iterations: expected an integer >= 1"),
        ({"data.root": "/nonexistent/crln-data"}, "/nonexistent/crln-data"),
    ],
    ids=[
        "tau_w>=tau",
        "R<1",
        "labeled>available",
        "patch>volumes",
        "stride>patch",
        "validation<0",
        "no-iterations",
        "no-data-root",
    ],
)
def test_out_of_range_options(
    overrides: dict[str, object], fragment: str, phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert_user_error(["train", "demo", *tiny_overrides(phantom_root, out, **overrides)], capsys, fragment)
    assert not out.exists() or not any(out.rglob("*")), "a refused run writes nothing"


def test_nan_in_an_unlabelled_case_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unlabelled cases are checked too, not only the labelled and validation ones."""
    root = _h5_root(tmp_path, ["c0", "c1", "c2"], None)
    write_h5_case(root / "c3.h5", _with_voxel(np.nan), _label())
    (root / "train.list").write_text("c0\nc1\nc2\nc3\n")
    out = tmp_path / "runs"
    overrides = tiny_overrides(root, out, **{"method.name": "mean_teacher", "data.labeled": 2, "data.validation": 0})
    assert_user_error(["train", "demo", *overrides], capsys, "c3.h5", "1 NaN and 0 Inf voxels")
    assert not out.exists() or not any(out.rglob("*"))
