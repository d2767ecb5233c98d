"""Typed run configuration: YAML presets (safe loader), ``key=value`` overrides, strict keys.

A run is described by one :class:`RunConfig` tree. YAML files give any subset of it (and may
inherit another preset with ``base: NAME``, deep-merged under the file's own keys); ``key=value``
overrides address nested fields with dots (``optim.lr=0.01``, ``data.patch_size=[64,64,48]``) and
their values are parsed as YAML scalars/lists. Unknown keys are rejected with the nearest valid
spelling. The ``method`` section is typed by the chosen method's own config class (see
:mod:`crln.methods`), so ``method.ema_decay=0.99`` is checked against that method's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from crln.data_formats import DATA_FORMAT_VALUES, one_of
from crln.dataset_json import DatasetJson
from crln.errors import CrlnError
from crln.method_configs import method_config_class

__all__ = [
    "DOWNSAMPLING_FACTOR",
    "INTENSITY_MODES",
    "LR_SCHEDULES",
    "MODEL_NAMES",
    "NORMALIZATIONS",
    "RUN_INVARIANT_KEYS",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "check_known_keys",
    "config_changes",
    "config_to_dict",
    "load_config",
    "load_raw",
    "resolve_from_dataset_json",
    "resolve_preset",
]

# The presets ship inside the package (package data ``crln/configs/*.yaml``), so an installed wheel has them.
PRESET_DIR = Path(str(resources.files("crln").joinpath("configs")))

# Values the networks of crln.models accept, here so that a config is checked before torch loads.
#: ``model.name`` values: the keys of ``crln.models.MODELS``.
MODEL_NAMES = ("vnet", "unet3d")
#: ``model.normalization`` values every network accepts.
NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")
#: Spatial sides of an input must be multiples of this (four stride-2 down-samplings in every network).
DOWNSAMPLING_FACTOR = 16
# Whole-volume intensity normalisation (crln.data.transforms.normalize_intensity).
INTENSITY_MODES = ("as_stored", "minmax", "zscore")
LR_SCHEDULES = ("poly", "step")  # optim.lr_schedule; crln.engine.schedule computes them


@dataclass
class DataConfig:
    """Where the cases are and how training patches are drawn."""

    name: str = "LA"  # dataset name, used in the run folder path
    format: str = "h5"  # {"h5", "nifti"}: crln.data_formats.DATA_FORMAT_VALUES
    root: str = ""  # dataset root folder (relative paths are relative to the working directory)
    train_split: str = "train"  # case list of the training pool (train.list / train.txt / imagesTr)
    test_split: str = "test"  # case list reported by `crln evaluate`
    val_split: str = ""  # case list that validates (BraTS19's val.txt); "" = the last data.validation training cases
    labeled: int = 8  # the first N cases of the training list are labelled (field convention)
    validation: int = 0  # the last N training cases are held out for checkpoint selection
    num_classes: int = 2  # unset: from dataset.json 'labels' (NIfTI folders), else 2
    patch_size: tuple[int, int, int] = (112, 112, 80)
    labeled_batch_size: int = 2
    unlabeled_batch_size: int = 2
    # Intensity normalisation of every volume, in training, validation, evaluate and predict alike (part of the
    # model's input contract, stored in the run's config): "as_stored" | "minmax" (per volume and channel to [0, 1],
    # the CRLN authors' code) | "zscore" (per volume and channel to mean 0, std 1: nnU-Net's MRI normalisation;
    # LA's stored crops are not: their means run 0.05-1.9). crln.data.transforms.INTENSITY_MODES
    intensity: str = "as_stored"
    rot_flip: bool = True
    brightness: tuple[float, float] = (1.0, 1.0)  # training patches × U(low, high), clipped to [0, 1] (needs minmax)
    noise_sigma: float = 0.0  # Gaussian noise on training patches (0 = off)
    noise_clip: float = 0.2
    num_workers: int = 2
    pin_memory: bool = True


@dataclass
class ModelConfig:
    """Network architecture."""

    name: str = "vnet"  # one of MODEL_NAMES (crln.models.MODELS)
    in_channels: int = 1  # unset: from dataset.json 'channel_names' (NIfTI folders), else 1
    n_filters: int = 16
    normalization: str = "batchnorm"
    dropout: float = 0.0


@dataclass
class OptimConfig:
    """SGD with a poly (the field's and the CRLN paper's setting) or step learning-rate schedule."""

    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False  # the CRLN authors' code uses Nesterov momentum
    weight_decay: float = 5e-4
    lr_schedule: str = "poly"  # one of LR_SCHEDULES (crln.engine.schedule)
    poly_power: float = 0.9  # poly: lr · (1 − step/iterations) ** poly_power
    lr_step_size: int = 2500  # step: lr · lr_step_gamma ** (step // lr_step_size) (UA-MT's code: ÷10 every 2,500)
    lr_step_gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm, 0 = no clipping


@dataclass
class TrainConfig:
    """Loop length, seeds, devices, logging and checkpoint cadence."""

    iterations: int = 6000
    seed: int = 1337
    deterministic: bool = False  # bit-reproducible kernels (slower on CUDA)
    device: str = "auto"  # {"auto", "cpu", "cuda", "cuda:N"}
    amp: str = "auto"  # {"auto", "none", "bf16", "fp16"}; auto = bf16 on CUDA, none on CPU
    channels_last: str = "auto"  # {"auto", "on", "off"}; auto = on (CPU and CUDA)
    compile: bool = False  # torch.compile the networks in place (CPU: 1.06-1.11x per step, RESULTS.md)
    threads: int = 0  # torch intra-op CPU threads; 0 = OMP_NUM_THREADS, else torch's default within the CPUs allowed
    log_every: int = 10
    val_every: int = 0  # validate every N iterations and at the end (needs data.validation > 0); 0 = never
    checkpoint_every: int = 500
    output_dir: str = "runs"
    tag: str = "default"


@dataclass
class LoggingConfig:
    """Optional extra sinks for the scalars of ``log.jsonl``."""

    tensorboard: bool = False  # also write <run>/tensorboard/ event files (needs the tensorboard package)


@dataclass
class EvalConfig:
    """Sliding-window evaluation protocol."""

    stride: tuple[int, int, int] = (18, 18, 4)
    sw_batch_size: int = 4
    largest_component: bool = False
    bootstrap_resamples: int = 100
    checkpoint: str = "final"  # what `crln evaluate RUN` and `crln report` use: "final" (else latest), "best", "latest"
    # The network validated, evaluated, predicted with and reported: "student" | "teacher" (the EMA teacher) |
    # "teacher_rectified" (CRLN: the teacher with ȳ + (1 − μ)·M(x), the authors' validate.py)
    network: str = "student"


@dataclass
class DistributedConfig:
    """Data-parallel training under ``torchrun`` (ignored in a single process; docs/distributed.md).

    The batch sizes of ``data`` are per process: N processes train on a global batch N times larger.
    """

    backend: str = "auto"  # {"auto", "nccl", "gloo"}; auto = nccl on CUDA, gloo on CPU
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (torch SyncBatchNorm, CUDA only)
    timeout_minutes: float = 30.0  # how long a collective waits for a slow or dead process


@dataclass
class RunConfig:
    """Everything one training run needs; saved resolved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the registered method's config dataclass (has a ``name`` field)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"valid keys: {', '.join(sorted(valid))}{hint}"


def check_known_keys(mapping: dict[str, Any], valid: list[str], *, source: str, prefix: str = "") -> None:
    """Reject a key of ``mapping`` outside ``valid``, naming ``source`` and the nearest valid spelling.

    For files with a fixed set of keys besides run configs (bench plans), e.g.
    ``bench plan p.yaml: unknown key runs[0].overridez: valid keys: config, name, overrides; did you mean 'overrides'?``
    """
    for key in mapping:
        if key not in valid:
            raise CrlnError(f"{source}: unknown key {prefix}{key}: {_suggest(str(key), valid)}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the field's annotated type, or raise a CrlnError naming ``where``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            value = [value] * len(args)  # a scalar broadcasts (e.g. patch_size=96)
        if len(value) != len(args):
            raise CrlnError(f"config key {where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise CrlnError(f"config key {where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise CrlnError(f"config key {where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CrlnError(f"config key {where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise CrlnError(f"config key {where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise CrlnError(f"config key {where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            full = f"{where}.{key}" if where else str(key)
            raise CrlnError(f"unknown config key {full}: {_suggest(str(key), list(fields))}")
        sub = f"{where}.{key}" if where else str(key)
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build_dataclass(annotation, {} if value is None else value, sub)  # `data:` is empty
        else:
            kwargs[key] = _coerce(value, annotation, sub)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CrlnError(f"config section {where or 'top level'}: {err}") from err


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a nested mapping.

    Raises:
        CrlnError: on an unknown key, a value of the wrong type, or an unknown method name.
    """
    raw = dict(raw or {})
    method_raw = raw.pop("method", None)
    method_raw = {"name": "supervised"} if method_raw is None else method_raw
    if not isinstance(method_raw, dict):  # e.g. method=crln for method.name=crln
        raise CrlnError(f"config key method: expected a mapping such as method.name=crln, got {method_raw!r}")
    method_name = method_raw.get("name", "supervised")
    method_cls = method_config_class(str(method_name))
    config = _build_dataclass(RunConfig, raw, "")
    config.method = _build_dataclass(method_cls, method_raw, "method")
    validate_config(config)
    return config


def validate_config(config: RunConfig) -> None:
    """Range checks that span fields; raises :class:`CrlnError` naming the key."""
    networks = type(config.method).inference_networks
    d = config.data
    if d.format not in DATA_FORMAT_VALUES:
        raise CrlnError(f"config key data.format: expected {one_of(DATA_FORMAT_VALUES)}, got {d.format!r}")
    if any(s < DOWNSAMPLING_FACTOR or s % DOWNSAMPLING_FACTOR for s in d.patch_size):
        raise CrlnError(
            f"config key data.patch_size: every side must be a positive multiple of {DOWNSAMPLING_FACTOR} "
            f"(the networks down-sample four times), got {list(d.patch_size)}; e.g. 64x64x48 at 0.5 scale"
        )
    if d.val_split and d.validation:
        raise CrlnError(
            f"config keys data.val_split ({d.val_split!r}) and data.validation ({d.validation}): expected only one "
            "source of validation cases; set data.validation=0 to validate on the list"
        )
    checks = [
        ("data.num_classes", d.num_classes >= 2, "an integer >= 2"),
        ("model.in_channels", config.model.in_channels >= 1, "an integer >= 1"),
        ("data.labeled", d.labeled >= 1, "an integer >= 1"),
        ("data.validation", d.validation >= 0, "an integer >= 0"),
        ("data.labeled_batch_size", d.labeled_batch_size >= 1, "an integer >= 1"),
        ("data.unlabeled_batch_size", d.unlabeled_batch_size >= 0, "an integer >= 0"),
        ("data.num_workers", d.num_workers >= 0, "an integer >= 0"),
        ("data.noise_sigma", d.noise_sigma >= 0, "a number >= 0"),
        ("data.noise_clip", d.noise_clip >= 0, "a number >= 0"),  # a negative clip makes the noise a constant
        ("data.intensity", d.intensity in INTENSITY_MODES, f"one of {', '.join(INTENSITY_MODES)}"),
        ("data.brightness", 0 < d.brightness[0] <= d.brightness[1], "two numbers 0 < low <= high"),
        (
            "data.brightness",
            tuple(d.brightness) == (1.0, 1.0) or d.intensity == "minmax",
            "[1, 1] unless data.intensity=minmax (brightness is clipped to [0, 1])",
        ),
        (
            "method.strong_view",
            getattr(config.method, "strong_view", "field") != "authors" or d.intensity == "minmax",
            "'field' unless data.intensity=minmax (the authors' view rescales to [0, 1])",
        ),
        (
            "data.labeled_batch_size",
            config.method.name != "bcp"
            or (d.labeled_batch_size % 2 == 0 and d.unlabeled_batch_size == d.labeled_batch_size),
            "an even number, and data.unlabeled_batch_size equal to it, for method bcp (it pairs halves of both)",
        ),
        (
            "method.pretrain_iterations",
            # only methods with a pretraining stage (BCP) have the key; a negative train.iterations is its own check
            not hasattr(config.method, "pretrain_iterations")
            or config.method.pretrain_iterations < config.train.iterations,
            f"fewer than train.iterations ({config.train.iterations}), so that self-training runs",
        ),
        # the loss weights of every method: a negative one trains towards a worse fit (BCP) or fails at build
        ("method.dice_weight", config.method.dice_weight >= 0, "a number >= 0"),
        ("method.ce_weight", config.method.ce_weight >= 0, "a number >= 0"),
        ("optim.lr", config.optim.lr > 0, "a number > 0"),
        ("optim.momentum", 0 <= config.optim.momentum < 1, "a number in [0, 1)"),
        ("optim.weight_decay", config.optim.weight_decay >= 0, "a number >= 0"),
        ("optim.lr_schedule", config.optim.lr_schedule in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
        ("optim.lr_step_size", config.optim.lr_step_size >= 1, "an integer >= 1"),
        ("optim.lr_step_gamma", 0 < config.optim.lr_step_gamma <= 1, "a number in (0, 1]"),
        ("optim.poly_power", config.optim.poly_power >= 0, "a number >= 0"),  # a negative one grows the lr
        ("optim.grad_clip", config.optim.grad_clip >= 0, "a number >= 0 (0 = no clipping)"),
        ("train.iterations", config.train.iterations >= 1, "an integer >= 1"),
        ("train.seed", config.train.seed >= 0, "an integer >= 0"),  # numpy seeds only non-negative integers
        ("train.threads", config.train.threads >= 0, "an integer >= 0 (0 = OMP_NUM_THREADS)"),
        ("train.log_every", config.train.log_every >= 1, "an integer >= 1"),
        ("train.checkpoint_every", config.train.checkpoint_every >= 1, "an integer >= 1"),
        ("train.val_every", config.train.val_every >= 0, "an integer >= 0"),
        ("train.amp", config.train.amp in ("auto", "none", "bf16", "fp16"), "one of auto, none, bf16, fp16"),
        ("train.channels_last", config.train.channels_last in ("auto", "on", "off"), "one of auto, on, off"),
        ("distributed.backend", config.distributed.backend in ("auto", "nccl", "gloo"), "one of auto, nccl, gloo"),
        ("distributed.timeout_minutes", config.distributed.timeout_minutes > 0, "a number > 0"),
        ("eval.checkpoint", config.eval.checkpoint in ("final", "best", "latest"), "one of final, best, latest"),
        ("eval.sw_batch_size", config.eval.sw_batch_size >= 1, "an integer >= 1"),
        # else the evaluation fails only after every case is predicted
        ("eval.bootstrap_resamples", config.eval.bootstrap_resamples >= 1, "an integer >= 1"),
        ("eval.network", config.eval.network in networks, f"one of {', '.join(networks)} for {config.method.name}"),
        (
            "eval.network",
            config.eval.network != "teacher_rectified" or getattr(config.method, "dim", False),
            "not teacher_rectified when method.dim=false (no M(x) to rectify with)",
        ),
        ("eval.stride", all(s >= 1 for s in config.eval.stride), "three integers >= 1"),
        (
            "eval.stride",
            all(s <= p for s, p in zip(config.eval.stride, d.patch_size, strict=True)),
            f"at most data.patch_size {list(d.patch_size)} per axis (a larger step leaves voxels unpredicted)",
        ),
        ("model.name", config.model.name in MODEL_NAMES, f"one of {', '.join(sorted(MODEL_NAMES))}"),
        ("model.normalization", config.model.normalization in NORMALIZATIONS, f"one of {', '.join(NORMALIZATIONS)}"),
        # the networks check these too, but only when built, after the data is loaded
        ("model.n_filters", config.model.n_filters >= 1, "an integer >= 1"),
        ("model.dropout", 0 <= config.model.dropout < 1, "a number in [0, 1)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            raise CrlnError(f"config key {key}: expected {expected}, got {value!r}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise CrlnError(f"override {item!r}: expected key=value, e.g. optim.lr=0.01")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise CrlnError(f"override {item!r}: expected a dotted key such as train.iterations")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise CrlnError(f"override {item!r}: value is not valid YAML ({err.__class__.__name__})") from err
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key=value`` override set (dotted keys, YAML values)."""
    import copy

    out = copy.deepcopy(raw or {})
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise CrlnError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def preset_summaries() -> list[tuple[str, str]]:
    """``(name, first line of its leading comment)`` for every preset of the package, sorted by name."""
    summaries = []
    for path in sorted(PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        comment = first[0].lstrip("#").strip().rstrip(":;,") if first and first[0].startswith("#") else ""
        summaries.append((path.stem, comment))
    return summaries


def resolve_preset(name_or_path: str) -> Path:
    """A config path, or the name of a preset in the package's ``crln/configs/`` (``la``, ``la_cpu``, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (PRESET_DIR / name_or_path, PRESET_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = [name for name, _ in preset_summaries()]
    hint = _suggest(name_or_path, presets).replace("valid keys", "presets") if presets else "no presets found"
    raise CrlnError(f"config {name_or_path!r}: no such file or preset ({hint})")


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader."""
    try:
        text = path.read_text()
    except OSError as err:
        raise CrlnError(f"config {path}: cannot read ({err.strerror})") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CrlnError(f"config {path}: invalid YAML{where}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CrlnError(f"config {path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_raw(name_or_path: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's raw mapping with its ``base:`` chain merged in (``base: la_cpu`` inherits that preset)."""
    path = resolve_preset(name_or_path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise CrlnError(f"config {path}: circular base chain ({chain})")
    raw = load_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise CrlnError(f"config {path}: key base must name a preset or YAML file, got {base!r}")
    # A relative base path is looked up beside the file first, then among the presets.
    beside = path.parent / base
    return _deep_merge(load_raw(str(beside) if beside.is_file() else base, (*_seen, path)), raw)


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset or YAML file (with its ``base:`` chain), apply ``key=value`` overrides, validate.

    ``data.num_classes`` and ``model.in_channels`` that neither the file nor an override sets come
    from the NIfTI dataset's ``dataset.json`` (see :func:`resolve_from_dataset_json`).
    """
    if isinstance(overrides, str):  # a str is iterable too: each character would be read as an override
        raise CrlnError(f"overrides: expected a list of key=value strings, got the string {overrides!r}")
    raw = apply_overrides(load_raw(name_or_path) if name_or_path else {}, overrides or [])
    config = build_config(raw)
    resolve_from_dataset_json(config, raw)
    return config


def resolve_from_dataset_json(config: RunConfig, raw: dict[str, Any]) -> None:
    """Take ``data.num_classes`` (from ``labels``) and ``model.in_channels`` (from ``channel_names``) from a
    NIfTI dataset's ``dataset.json`` where ``raw`` (the user's preset and overrides) does not set them;
    where it does, the two must agree.

    Raises:
        CrlnError: a value set by the user contradicts ``dataset.json``, naming both.
    """
    d = config.data
    meta_path = Path(d.root) / "dataset.json"
    if d.format != "nifti" or not d.root or not meta_path.is_file():
        return
    dataset = DatasetJson.read(d.root)
    channels = ", ".join(map(str, dataset.channel_names.values()))
    declared = {
        ("data", "num_classes"): (dataset.num_classes, f"'labels' ({', '.join(dataset.labels)})"),
        ("model", "in_channels"): (dataset.num_channels, f"'channel_names' ({channels})"),
    }
    for (section, key), (value, what) in declared.items():
        if value is None:
            continue
        current = getattr(getattr(config, section), key)
        if key in (raw.get(section) or {}) and current != value:
            raise CrlnError(
                f"config key {section}.{key} = {current} contradicts {meta_path}: {what} gives {value}; "
                # a preset's value counts as set (la*, pancreas*, brats* set data.num_classes): say what fits
                f"expected the same value: override {section}.{key}={value}, or leave {section}.{key} unset"
            )
        setattr(getattr(config, section), key, value)
    try:
        validate_config(config)
    except CrlnError as err:  # e.g. 'labels' naming the background only
        raise CrlnError(f"{err} (taken from {meta_path})") from None


# Settings that change neither a run's weights nor its validation-best choice: where and how it runs.
RUN_INVARIANT_KEYS = frozenset(
    {
        "train.device",
        "train.threads",
        "train.log_every",
        "train.checkpoint_every",
        "train.output_dir",
        "distributed.backend",
        "distributed.timeout_minutes",
        "data.num_workers",
        "data.pin_memory",
        "data.root",
    }
)


def _flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any], allowed: Iterable[str]) -> list[str]:
    """``"key: old -> new"`` for every dotted key of the ``saved`` config (a nested dict) whose value ``current``
    changes, sorted, except the ``allowed`` keys and keys under an allowed ``"section."`` prefix. Keys the saved
    config lacks are fields added to crln since: they hold their defaults and are not compared."""
    old, new = _flatten_keys(saved), _flatten_keys(current)
    allowed = tuple(allowed)
    prefixes = tuple(a for a in allowed if a.endswith("."))
    changed = sorted(k for k in old if old[k] != new.get(k) and k not in allowed and not k.startswith(prefixes))
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in changed]


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) for YAML, JSON and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)
