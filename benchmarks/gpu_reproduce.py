"""Full-scale GPU reproduction in 10-minute device calls (issue #10), and the local side of its transfers.

The lent GPU machine runs one command at a time (at most 600 s), carries at most 64 MiB of
git-ignored files in per call, returns at most 8 files of at most 16 MiB (64 MiB together) from
``$OUT``, keeps ``/tmp`` only while it stays warm (30 s after a call) and starts bare in every
session. A resumable CRLN checkpoint is about 109 MiB (student + EMA teacher + SGD momentum, all
float32, nothing redundant), so it travels as a *snapshot*: 15 MiB pieces in bundles ``a``, ``b``
of at most 4 pieces (60 MiB), each with a ``snapshot.json`` of SHA-256 sums, plus ``run_files.tar.gz``
(config, meta, log.jsonl, evaluations).

Staging and printing are shared with ``gpu_check.py`` (``device_io.py``). Device side, one command per call
(``docs/reproduce.md`` has the exact calls)::

    python3 benchmarks/gpu_reproduce.py device --config la_crln [--set key=value ...] [--evaluate]

Each call: installs the carried wheels (``data/wheels``) once into ``/tmp/crln/site``; merges the
carried compact data parts (``data/LA_compact/part*``) into ``/tmp/crln/data/LA_compact``; stages
carried snapshot bundles (``runs/device/<key>/current/{a,b}``) and, once both are there, restores
the run folder under ``/tmp/crln/runs``; sends the next bundle of a half-sent snapshot to ``$OUT``;
trains (``--resume`` when a checkpoint exists) until the call's time budget, ending on a
checkpoint; evaluates when asked and finished; snapshots the new checkpoint; and, if nothing was
sent yet, sends its bundle ``a``. So one call returns one bundle, and a snapshot is complete
locally every second call.

Local side::

    python benchmarks/gpu_reproduce.py collect FILES_AT      # after each call: file what came back
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # device_io beside this script, however it is loaded
from device_io import STARTED, WORK, Echo, TransferError, import_crln, install_wheels, stage_data

__all__ = [
    "TransferError",
    "collect",
    "device_call",
    "join_snapshot",
    "main",
    "pack_snapshot",
    "run_key",
    "write_run_files",
]

CALL_LIMIT_S = 600.0  # one device command
RESERVE_S = 60.0  # kept back from training for the snapshot, the copy to $OUT and interpreter start
MIN_TRAIN_S = 60.0  # a shorter remainder is not worth loading the data for
EVAL_S = 240.0  # the 20 full-resolution LA test cases, strides 18x18x4: a GPU estimate with margin
PIECE_MIB = 15.0  # the device returns files of at most 16 MiB
BUNDLE_PIECES = 4  # 4 x 15 MiB = 60 MiB of the 64 MiB one call carries or returns
MIB = 2**20
SNAPSHOT_FILE = "snapshot.json"
SENT_FILE = "sent.json"
RUN_FILES = "run_files.tar.gz"
PIECE_PREFIX = "ckpt."
SMALL_FILE_SUFFIXES = (".yaml", ".json", ".jsonl", ".csv")
STORE = Path("runs/device")  # local home of snapshots; carry runs/device/<key>/current/{a,b}
CURRENT = "current"
_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_HASH_CHUNK = 4 * MIB


# ----------------------------------------------------------------------------------------------------------
# snapshots: pieces, bundles, checksums


def run_key(relative_run: str) -> str:
    """File-name-safe key of a run folder path relative to the runs root (``LA/crln__vnet__default/seed1337``)."""
    return _KEY_CHARS.sub("_", relative_run.strip("/").replace("/", "--"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_step(path: Path) -> int:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state["step"])


def write_run_files(run_dir: Path, tar_path: Path) -> None:
    """Tar the run folder's small files (config, meta, log, evaluation CSV/JSON), never checkpoints."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(run_dir.rglob("*")):
            rel = path.relative_to(run_dir)
            if path.is_file() and path.suffix in SMALL_FILE_SUFFIXES and "tensorboard" not in rel.parts:
                tar.add(path, arcname=str(rel))
    os.replace(tmp, tar_path)


def pack_snapshot(
    run_dir: Path,
    relative_run: str,
    out_root: Path,
    *,
    piece_mib: float = PIECE_MIB,
    bundle_pieces: int = BUNDLE_PIECES,
) -> Path:
    """Cut ``run_dir/checkpoint_latest.pt`` into pieces grouped in bundles under ``out_root/step<k>/``.

    Returns:
        The snapshot folder, holding one folder per bundle (``a``, ``b`` ...), each with its pieces and
        a ``snapshot.json`` describing every piece of the snapshot (name, bytes, SHA-256, bundle).
    """
    checkpoint = run_dir / "checkpoint_latest.pt"
    if not checkpoint.is_file():
        raise TransferError(f"{checkpoint}: no checkpoint to snapshot")
    step = _checkpoint_step(checkpoint)
    snap = out_root / f"step{step}"
    tmp = out_root / f".step{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    piece_bytes = int(piece_mib * MIB)
    pieces: list[dict[str, Any]] = []
    with checkpoint.open("rb") as handle:
        for index, chunk in enumerate(iter(lambda: handle.read(piece_bytes), b"")):
            bundle = chr(ord("a") + index // bundle_pieces)
            name = f"{PIECE_PREFIX}{index:03d}"
            (tmp / bundle).mkdir(parents=True, exist_ok=True)
            (tmp / bundle / name).write_bytes(chunk)
            pieces.append(
                {"name": name, "bundle": bundle, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()}
            )
    meta = {
        "run": relative_run.strip("/"),
        "key": run_key(relative_run),
        "step": step,
        "finished": (run_dir / "checkpoint_final.pt").is_file(),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "checkpoint_sha256": _sha256(checkpoint),
        "bundles": sorted({p["bundle"] for p in pieces}),
        "pieces": pieces,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for bundle in meta["bundles"]:
        (tmp / bundle / SNAPSHOT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(snap, ignore_errors=True)
    os.replace(tmp, snap)
    return snap


def read_snapshot_meta(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / SNAPSHOT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TransferError(f"{path}: unreadable snapshot description ({err.__class__.__name__})") from None


def missing_pieces(snap_dir: Path, meta: dict[str, Any]) -> list[str]:
    """Names of the pieces of ``meta`` not (yet) under ``snap_dir/<bundle>/``."""
    return [p["name"] for p in meta["pieces"] if not (snap_dir / p["bundle"] / p["name"]).is_file()]


def join_snapshot(snap_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Verify every piece and write ``run_dir/checkpoint_latest.pt`` (and ``_final`` when finished) atomically.

    The run's small files come from the newest ``run_files.tar`` among the bundles.

    Raises:
        TransferError: a piece is missing or its checksum differs (nothing is written then).
    """
    bundles = sorted(p for p in snap_dir.iterdir() if (p / SNAPSHOT_FILE).is_file())
    if not bundles:
        raise TransferError(f"{snap_dir}: no bundle with a {SNAPSHOT_FILE}")
    meta = read_snapshot_meta(bundles[0])
    missing = missing_pieces(snap_dir, meta)
    if missing:
        raise TransferError(f"{snap_dir}: snapshot of step {meta['step']} lacks pieces {', '.join(missing)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "checkpoint_latest.pt"
    tmp = run_dir / ".checkpoint_latest.pt.join.tmp"
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for piece in meta["pieces"]:
            data = (snap_dir / piece["bundle"] / piece["name"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != piece["sha256"]:
                tmp.unlink(missing_ok=True)
                raise TransferError(f"{snap_dir / piece['bundle'] / piece['name']}: checksum differs, piece corrupt")
            digest.update(data)
            out.write(data)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != meta["checkpoint_sha256"]:
        tmp.unlink(missing_ok=True)
        raise TransferError(f"{snap_dir}: the joined checkpoint's checksum differs from {SNAPSHOT_FILE}")
    tars = [b / RUN_FILES for b in bundles if (b / RUN_FILES).is_file()]
    if tars:
        _extract_run_files(tars[-1], run_dir)
    os.replace(tmp, target)
    if meta["finished"]:
        shutil.copyfile(target, run_dir / ".checkpoint_final.pt.tmp")
        os.replace(run_dir / ".checkpoint_final.pt.tmp", run_dir / "checkpoint_final.pt")
    return meta


def _extract_run_files(tar_path: Path, run_dir: Path) -> None:
    with tarfile.open(tar_path) as tar:
        tar.extractall(run_dir, filter="data")  # regular files inside run_dir only


def _known_run(key_store: Path) -> str | None:
    """The run folder (relative) of a key, from any snapshot filed under ``store/<key>``."""
    found = sorted(key_store.glob(f"{CURRENT}/*/{SNAPSHOT_FILE}")) + sorted(
        key_store.glob(f"incoming/*/*/{SNAPSHOT_FILE}")
    )
    return read_snapshot_meta(found[0].parent)["run"] if found else None


def _copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copyfile(path, dst / path.name)


# ----------------------------------------------------------------------------------------------------------
# local side


def collect(files_at: Path, store: Path, runs: Path) -> list[str]:
    """File what one call returned (``files_at/<key>/<bundle>/``) under ``store`` and restore complete snapshots.

    A complete snapshot is joined into ``runs/<run>/`` (checksums verified) and becomes
    ``store/<key>/current/``, the folder to carry to the next session. Returns one line per event.
    """
    lines: list[str] = []
    for key_dir in sorted(p for p in files_at.iterdir() if p.is_dir()):
        for bundle_dir in sorted(p for p in key_dir.iterdir() if (p / SNAPSHOT_FILE).is_file()):
            meta = read_snapshot_meta(bundle_dir)
            incoming = store / meta["key"] / "incoming" / f"step{meta['step']}"
            _copy_tree(bundle_dir, incoming / bundle_dir.name)
            lines.append(f"{meta['key']}: step {meta['step']} bundle {bundle_dir.name} filed in {incoming}")
        if (key_dir / RUN_FILES).is_file():  # the run's log, config and evaluations as of the end of the call
            (store / key_dir.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(key_dir / RUN_FILES, store / key_dir.name / RUN_FILES)
            relative = _known_run(store / key_dir.name)
            if relative and (runs / relative / "checkpoint_latest.pt").is_file():
                _extract_run_files(store / key_dir.name / RUN_FILES, runs / relative)
                lines.append(f"{key_dir.name}: log and evaluations updated in {runs / relative}")
    for incoming_root in sorted(store.glob("*/incoming")):
        steps = sorted(incoming_root.iterdir(), key=lambda p: int(p.name.removeprefix("step")))
        for snap in steps:
            meta = read_snapshot_meta(next(p for p in snap.iterdir() if (p / SNAPSHOT_FILE).is_file()))
            if missing_pieces(snap, meta):
                continue
            run_files = incoming_root.parent / RUN_FILES
            if run_files.is_file():  # travels with bundle a when the snapshot is carried back
                shutil.copyfile(run_files, snap / meta["bundles"][0] / RUN_FILES)
            join_snapshot(snap, runs / meta["run"])
            current = incoming_root.parent / CURRENT
            shutil.rmtree(current, ignore_errors=True)
            os.replace(snap, current)
            for older in steps:
                if older.exists() and int(older.name.removeprefix("step")) < meta["step"]:
                    shutil.rmtree(older)
            lines.append(
                f"{meta['key']}: step {meta['step']} complete -> {runs / meta['run']}; carry "
                + ", ".join(str(current / b) for b in meta["bundles"])
            )
    return lines


# ----------------------------------------------------------------------------------------------------------
# device side


def _stage_snapshots(carried: Path, work: Path) -> list[str]:
    """Copy carried bundles into ``work/in`` and restore every complete snapshot newer than the run's checkpoint."""
    lines = []
    for bundle_dir in sorted(carried.glob(f"*/{CURRENT}/*")):
        if (bundle_dir / SNAPSHOT_FILE).is_file():
            meta = read_snapshot_meta(bundle_dir)
            _copy_tree(bundle_dir, work / "in" / meta["key"] / f"step{meta['step']}" / bundle_dir.name)
            lines.append(f"staged {meta['key']} step {meta['step']} bundle {bundle_dir.name}")
    for snap in sorted((work / "in").glob("*/step*")):
        meta = read_snapshot_meta(next(p for p in snap.iterdir() if (p / SNAPSHOT_FILE).is_file()))
        run_dir = work / "runs" / meta["run"]
        if missing_pieces(snap, meta):
            lines.append(f"{meta['key']} step {meta['step']}: waiting for {', '.join(missing_pieces(snap, meta))}")
            continue
        latest = run_dir / "checkpoint_latest.pt"
        if not latest.is_file() or _checkpoint_step(latest) < meta["step"]:
            join_snapshot(snap, run_dir)
            lines.append(f"{meta['key']}: restored step {meta['step']} into {run_dir}")
        shutil.rmtree(snap)
    return lines


def _sent(snap: Path) -> list[str]:
    path = snap / SENT_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def _send_bundle(snap: Path, bundle: str, out: Path) -> str:
    meta = read_snapshot_meta(snap / bundle)
    target = out / meta["key"] / bundle
    _copy_tree(snap / bundle, target)
    (snap / SENT_FILE).write_text(json.dumps([*_sent(snap), bundle]))
    return f"sent bundle {bundle} of step {meta['step']} ({len(meta['bundles'])} bundles) to {target}"


def _next_bundle(snap: Path) -> str | None:
    meta = read_snapshot_meta(next(p for p in snap.iterdir() if (p / SNAPSHOT_FILE).is_file()))
    pending = [b for b in meta["bundles"] if b not in _sent(snap)]
    return pending[0] if pending else None


def _snapshots(out_root: Path) -> list[Path]:
    return sorted(out_root.glob("step*"), key=lambda p: int(p.name.removeprefix("step")))


def _prune(out_root: Path) -> None:
    """Keep the newest snapshot and a half-sent one; drop the rest (fully sent, or superseded before sending)."""
    snaps = _snapshots(out_root)
    for snap in snaps[:-1]:
        if not _sent(snap) or _next_bundle(snap) is None:
            shutil.rmtree(snap)


def _resolve_run(args: argparse.Namespace, work: Path, data_root: Path) -> tuple[Any, str]:
    from crln.config import load_config, load_yaml

    overrides = list(args.set)
    config_name = args.config
    if args.plan:
        plan = load_yaml(Path(args.plan))
        runs = plan.get("runs") or []
        if not 0 <= args.row < len(runs):
            raise TransferError(f"--row {args.row}: plan {args.plan} has rows 0..{len(runs) - 1}")
        row = runs[args.row]
        config_name = row["config"]
        seed = (plan.get("seeds") or [1337])[0]
        overrides = [*(plan.get("overrides") or []), *(row.get("overrides") or []), f"train.seed={seed}", *overrides]
    if not config_name:
        raise TransferError("give --config NAME or --plan PLAN --row N")
    overrides += [f"data.root={data_root}", f"train.output_dir={work / 'runs'}"]
    config = load_config(config_name, overrides)
    d, t = config.data, config.train
    return config, f"{d.name}/{config.method.name}__{config.model.name}__{t.tag}/seed{t.seed}"


def _log_speed(run_dir: Path) -> str:
    from crln.engine.run_folder import read_log

    records = [r for r in read_log(run_dir / "log.jsonl") if "seconds_per_iteration" in r]
    if not records:
        return ""
    last = records[-5:]
    per_it = sum(r["seconds_per_iteration"] for r in last) / len(last)
    return f", {per_it:.3f} s/it lately, loss {last[-1].get('loss', float('nan')):.4f}"


def device_call(args: argparse.Namespace) -> list[str]:
    """One device call: stage, send a pending bundle, train to the budget, evaluate, snapshot, send."""
    work, out = Path(args.work), Path(args.out or os.environ.get("OUT") or "")
    if not str(out):
        raise TransferError("no output folder: set $OUT (the device sets it) or pass --out")
    deadline = STARTED + args.call_s - args.reserve_s
    site = work / "site"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    install_wheels(Path(args.wheels), site)
    import_crln(site)

    data_root = work / "data" / Path(args.data_src).name
    lines = Echo()
    lines.append(stage_data(Path(args.data_src), data_root)["line"])
    lines.extend(_stage_snapshots(Path(args.snapshots), work))
    if not (args.config or args.plan):
        return lines  # a staging call
    config, relative_run = _resolve_run(args, work, data_root)
    run_dir = work / "runs" / relative_run
    out_root = work / "out" / run_key(relative_run)
    sent_now = False
    half_sent = [s for s in _snapshots(out_root) if _sent(s) and _next_bundle(s)]
    if half_sent:  # finish the snapshot that is half home before sending a newer one
        lines.append(_send_bundle(half_sent[-1], _next_bundle(half_sent[-1]), out))
        sent_now = True

    from crln.engine.trainer import train

    latest, final = run_dir / "checkpoint_latest.pt", run_dir / "checkpoint_final.pt"
    # a finished run may still be extended (train.iterations is a resumable setting)
    finished = final.is_file() and _checkpoint_step(final) >= config.train.iterations
    budget = deadline - time.monotonic()
    if not args.no_train and not finished:
        if budget < MIN_TRAIN_S:
            lines.append(f"train: skipped, {budget:.0f} s left in this call")
        else:
            result = train(config, resume=latest.is_file(), progress=False, time_budget_s=budget)
            state = "finished" if result.complete else f"stopped on the time budget ({budget:.0f} s)"
            lines.append(f"train: {relative_run} at iteration {result.steps}/{config.train.iterations}, {state}")
    if latest.is_file():
        lines.append(f"run: {relative_run} step {_checkpoint_step(latest)}{_log_speed(run_dir)}")

    snaps = _snapshots(out_root)
    if latest.is_file() and (not snaps or int(snaps[-1].name.removeprefix("step")) != _checkpoint_step(latest)):
        pack_snapshot(run_dir, relative_run, out_root, piece_mib=args.piece_mib, bundle_pieces=args.bundle_pieces)
    _prune(out_root)
    snaps = _snapshots(out_root)
    if not sent_now and snaps and _next_bundle(snaps[-1]):
        lines.append(_send_bundle(snaps[-1], _next_bundle(snaps[-1]), out))
    elif not snaps:
        lines.append(f"nothing to send: {relative_run} has no checkpoint on this machine")
    elif not _next_bundle(snaps[-1]):
        lines.append("nothing left to send: the newest snapshot is home")
    if run_dir.is_dir():
        write_run_files(run_dir, out / run_key(relative_run) / RUN_FILES)

    # Last, so that a slow evaluation can never cost the bundle this call sends.
    if args.evaluate and final.is_file() and _checkpoint_step(final) >= config.train.iterations:
        left = STARTED + args.call_s - time.monotonic()
        summary_path = run_dir / "eval" / "summary.json"
        if summary_path.is_file():
            lines.append(f"evaluate: already done, {summary_path}")
        elif left < args.eval_s:
            lines.append(f"evaluate: deferred, {left:.0f} s left in this call (--eval-s {args.eval_s:g})")
        else:
            from crln.evaluation import evaluate, format_summary_table

            result = evaluate(run_dir, device="auto", progress=False)
            lines.append(format_summary_table(result["summary"], f"{relative_run}: test list"))
            write_run_files(run_dir, out / run_key(relative_run) / RUN_FILES)
    pending = [f"{s.name} bundle {_next_bundle(s)}" for s in _snapshots(out_root) if _next_bundle(s)]
    lines.append(f"pending on this machine: {', '.join(pending) or 'nothing'}")
    return lines


# ----------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("device", help="one device call: stage, train to the budget, evaluate, send one bundle")
    p.add_argument("--config", help="preset or YAML (e.g. la_crln)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--plan", help="bench plan YAML; with --row N its row N (config + overrides, first seed)")
    p.add_argument("--row", type=int, default=0)
    p.add_argument("--evaluate", action="store_true", help="evaluate on the test list once the run is finished")
    p.add_argument("--no-train", action="store_true", help="stage and send only (e.g. the last bundle)")
    p.add_argument("--data-src", default="data/LA_compact", help="carried compact folder or its part* folders")
    p.add_argument("--snapshots", default=str(STORE), help="carried snapshot bundles: <dir>/<key>/current/<bundle>")
    p.add_argument("--wheels", default="data/wheels", help="carried wheels (monai, nibabel)")
    p.add_argument("--work", default=str(WORK), help="working folder on the device (kept while it is warm)")
    p.add_argument("--out", help="where to put what comes back (default $OUT)")
    p.add_argument("--call-s", type=float, default=CALL_LIMIT_S, help="the call's limit in seconds")
    p.add_argument("--reserve-s", type=float, default=RESERVE_S, help="seconds kept for snapshot and copy")
    p.add_argument("--eval-s", type=float, default=EVAL_S, help="evaluate only with this many seconds left")
    p.add_argument("--piece-mib", type=float, default=PIECE_MIB)
    p.add_argument("--bundle-pieces", type=int, default=BUNDLE_PIECES)

    p = sub.add_parser("collect", help="file what a call returned and restore complete snapshots locally")
    p.add_argument("files_at", help="the folder the device's files were copied to")
    p.add_argument("--store", default=str(STORE))
    p.add_argument("--runs", default="runs", help="local runs root (train.output_dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "device":
            device_call(args)  # prints as it goes
            lines = []
        else:
            lines = collect(Path(args.files_at), Path(args.store), Path(args.runs))
    except TransferError as err:
        print(f"gpu_reproduce: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a CrlnError from training or evaluation: one line, as the crln CLI does
        if type(err).__name__ != "CrlnError":
            raise
        print(f"gpu_reproduce: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
