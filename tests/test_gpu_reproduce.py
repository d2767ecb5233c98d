"""benchmarks/gpu_reproduce.py on the CPU: snapshots in checksummed pieces, one bundle per call, restore on a
fresh machine and resume there (the flow of docs/reproduce.md, with phantoms and a tiny network)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, tiny_overrides
from crln.data.compact import compact_h5_dataset
from crln.engine.checkpoint import load_checkpoint, save_checkpoint

SPEC = importlib.util.spec_from_file_location("gpu_reproduce", REPO_ROOT / "benchmarks" / "gpu_reproduce.py")
gpu = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu)

TINY_PIECE_MIB = 1.0  # the tiny network's checkpoint (about 5 MB) makes 5 pieces in two bundles
TINY_BUNDLE_PIECES = 3
LONG_CALL_S = 3600  # no time pressure in these tests: the budget logic has its own test
ITERATIONS, MORE_ITERATIONS = 2, 3


def _checkpoint(run_dir: Path, step: int, numel: int = 200_000) -> Path:
    path = run_dir / "checkpoint_latest.pt"
    state = {"method": "supervised", "config": {}, "step": step, "method_state": {"w": torch.randn(numel)}}
    save_checkpoint(path, state)
    (run_dir / "log.jsonl").write_text(json.dumps({"step": step, "loss": 0.5}) + "\n")
    return path


def test_snapshot_pieces_join_bit_for_bit_and_refuse_corruption(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "LA" / "crln__vnet__default" / "seed1337"
    source = _checkpoint(run, step=7)
    snap = gpu.pack_snapshot(run, "LA/crln__vnet__default/seed1337", tmp_path / "out", piece_mib=0.25)
    meta = gpu.read_snapshot_meta(snap / "a")
    assert snap.name == "step7" and meta["key"] == "LA--crln__vnet__default--seed1337"
    assert all(p["bytes"] <= 0.25 * 2**20 for p in meta["pieces"]) and len(meta["pieces"]) >= 3
    gpu.write_run_files(run, snap / "a" / gpu.RUN_FILES)

    restored = tmp_path / "restored"
    gpu.join_snapshot(snap, restored)
    assert (restored / "checkpoint_latest.pt").read_bytes() == source.read_bytes()
    assert (restored / "log.jsonl").read_text() == (run / "log.jsonl").read_text()
    assert not (restored / "checkpoint_final.pt").exists()  # the run was not finished

    piece = snap / meta["pieces"][1]["bundle"] / meta["pieces"][1]["name"]
    piece.write_bytes(b"\0" + piece.read_bytes()[1:])
    with pytest.raises(gpu.TransferError, match="checksum differs"):
        gpu.join_snapshot(snap, tmp_path / "corrupt")
    piece.unlink()
    with pytest.raises(gpu.TransferError, match=f"lacks pieces {meta['pieces'][1]['name']}"):
        gpu.join_snapshot(snap, tmp_path / "missing")
    assert not (tmp_path / "corrupt" / "checkpoint_latest.pt").exists()


def _device(repo: Path, work: Path, out: Path, *extra: str) -> list[str]:
    args = gpu.build_parser().parse_args(
        [
            "device",
            "--data-src", str(repo / "data" / "ph_compact"),
            "--snapshots", str(repo / "runs" / "device"),
            "--wheels", str(repo / "data" / "wheels"),
            "--work", str(work),
            "--out", str(out),
            "--call-s", str(LONG_CALL_S),
            "--piece-mib", str(TINY_PIECE_MIB),
            "--bundle-pieces", str(TINY_BUNDLE_PIECES),
            *extra,
        ]
    )  # fmt: skip
    return gpu.device_call(args)


def test_device_calls_send_one_bundle_each_and_a_fresh_machine_resumes(phantom_root: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"  # stands in for the working tree (carried paths) on both machines
    compact_h5_dataset(phantom_root, repo / "data" / "ph_compact", max_part_mib=0.5)
    assert len(list((repo / "data" / "ph_compact").glob("part*"))) >= 2
    config = ["--config", "demo"]
    for item in tiny_overrides(
        Path("unused"), Path("unused"), **{"train.iterations": ITERATIONS, "data.validation": 0}
    ):
        if not item.startswith(("data.root=", "train.output_dir=")):
            config += ["--set", item]

    # machine 1, call 1: stage the parts, train to the end, evaluate, snapshot, send bundle a
    work1 = tmp_path / "work1"
    lines = _device(repo, work1, tmp_path / "out1", *config, "--evaluate")
    text = "\n".join(lines)
    assert "complete" in lines[0] and f"at iteration {ITERATIONS}/{ITERATIONS}, finished" in text
    assert (
        "| dice |" in text
        and f"sent bundle a of step {ITERATIONS}" in text
        and f"pending on this machine: step{ITERATIONS} bundle b" in text
    )
    key = "phantom--supervised__vnet__demo--seed1337"
    assert gpu.read_snapshot_meta(tmp_path / "out1" / key / "a")["bundles"] == ["a", "b"]
    returned = [p.relative_to(tmp_path / "out1") for p in (tmp_path / "out1").rglob("*") if p.is_file()]
    assert Path(key, gpu.RUN_FILES) in returned and Path(key, "a", gpu.SNAPSHOT_FILE) in returned
    assert len(returned) <= 8 and all(len(p.parts) <= 3 for p in returned)  # the device's limits on $OUT
    store, runs = repo / "runs" / "device", repo / "runs"
    assert "bundle a filed" in "\n".join(gpu.collect(tmp_path / "out1", store, runs))
    assert not (runs / "phantom").exists()  # half a snapshot restores nothing

    # call 2: nothing to train; the rest of the snapshot comes home
    lines = _device(repo, work1, tmp_path / "out2", *config, "--no-train")
    assert any(f"sent bundle b of step {ITERATIONS}" in line for line in lines)
    events = gpu.collect(tmp_path / "out2", store, runs)
    assert any(f"step {ITERATIONS} complete" in line for line in events)
    local_run = runs / "phantom" / "supervised__vnet__demo" / "seed1337"
    device_run = work1 / "runs" / "phantom" / "supervised__vnet__demo" / "seed1337"
    assert (local_run / "checkpoint_latest.pt").read_bytes() == (device_run / "checkpoint_latest.pt").read_bytes()
    assert (local_run / "checkpoint_final.pt").is_file() and (local_run / "eval" / "summary.json").is_file()
    assert (local_run / "log.jsonl").read_text() == (device_run / "log.jsonl").read_text()

    # machine 2 (bare): the carried bundles restore the run, and a longer schedule resumes from it
    work2 = tmp_path / "work2"
    lines = _device(repo, work2, tmp_path / "out3", *config, "--set", f"train.iterations={MORE_ITERATIONS}")
    text = "\n".join(lines)
    assert f"{key}: restored step {ITERATIONS}" in text, text
    assert f"at iteration {MORE_ITERATIONS}/{MORE_ITERATIONS}, finished" in text
    resumed = load_checkpoint(
        work2 / "runs" / "phantom" / "supervised__vnet__demo" / "seed1337" / "checkpoint_final.pt"
    )
    assert resumed["step"] == MORE_ITERATIONS
