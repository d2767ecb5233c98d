"""Size of a resumable checkpoint of a preset (default la_crln), what it holds, and what lossless compression buys.

Usage: python benchmarks/bench_checkpoint_size.py [--config la_crln] [--checkpoint RUN/checkpoint_latest.pt]

Builds the preset's method on the CPU with its SGD optimiser, takes one step on zero gradients so
that every momentum buffer exists (as after any real iteration), and writes the checkpoint dict the
trainer writes (``crln.engine.state.RunState.checkpoint``) to a temporary file. Prints the bytes per part (student,
EMA teacher, DIM, CPS head, optimiser momentum) and the file size, and how many 15 MiB pieces and
64 MiB device calls it needs. With ``--checkpoint`` (a real, trained checkpoint of the same
architecture) it also measures lossless compression of its tensors: zlib on the raw float32 bytes,
on byte planes (sign/exponent bytes apart), and the EMA teacher XOR the student (bits they share).
"""

from __future__ import annotations

import argparse
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from crln.config import load_config
from crln.engine.checkpoint import load_checkpoint
from crln.engine.device import Performance
from crln.engine.run_folder import RunFolder
from crln.engine.state import RunState
from crln.methods import method_for_run

MIB = 2**20
PIECE_MIB = 15  # the device returns files of at most 16 MiB
CALL_MIB = 64  # what one device call carries in or returns
ZLIB_LEVEL = 6
FLOAT_BYTES = 4


def _byte_planes(words: np.ndarray) -> bytes:
    return np.ascontiguousarray(words.view(np.uint8).reshape(-1, FLOAT_BYTES).T).tobytes()


def _compression(path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = state["method_state"]
    student = [k for k, v in weights.items() if k.startswith("student.") and v.is_floating_point()]
    teacher = ["teacher." + k.removeprefix("student.") for k in student]

    def words(keys: list[str]) -> np.ndarray:
        return np.concatenate([weights[k].numpy().ravel().view(np.uint32) for k in keys])

    momentum = np.concatenate(
        [s["momentum_buffer"].numpy().ravel().view(np.uint32) for s in state["optimizer"]["state"].values()]
    )
    s, t = words(student), words(teacher)
    print(f"\nLossless compression of {path} (step {state['step']}), zlib level {ZLIB_LEVEL}:\n")
    print("| tensor | MiB | zlib raw | zlib byte planes |")
    print("|---|---|---|---|")
    total_best = 0.0
    for name, data in (("student", s), ("EMA teacher", t), ("teacher XOR student", t ^ s), ("momentum", momentum)):
        raw = len(zlib.compress(data.tobytes(), ZLIB_LEVEL)) / data.nbytes
        planes = len(zlib.compress(_byte_planes(data), ZLIB_LEVEL)) / data.nbytes
        print(f"| {name} | {data.nbytes / MIB:.1f} | {raw:.3f} | {planes:.3f} |")
        if name != "EMA teacher":
            total_best += data.nbytes * planes
    print(f"\nBest lossless total (student, teacher as XOR, momentum; byte planes): {total_best / MIB:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="la_crln")
    parser.add_argument("--checkpoint", help="a real checkpoint of the same architecture, for compression figures")
    args = parser.parse_args()

    config = load_config(args.config, ["train.device=cpu"])
    method = method_for_run(config)
    optimizers = method.configure_optimizers(config.optim)
    for p in method.trainable_parameters():
        p.grad = torch.zeros_like(p)
    optimizers.main.step()  # creates every momentum buffer, as the first real iteration does
    with tempfile.TemporaryDirectory() as tmp:
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        perf = Performance.for_device(torch.device("cpu"))
        run = RunState(config, RunFolder(tmp), method, optimizers, scaler, perf, world=1, main=True)
        run.checkpoint("latest", 1)  # what the trainer writes, written by the trainer's own code
        path = run.folder.checkpoint("latest")
        size = path.stat().st_size
        state = load_checkpoint(path)
    parts: Counter[str] = Counter()
    for key, value in state["method_state"].items():
        parts[key.split(".")[0]] += value.numel() * value.element_size()
    parts["optimizer momentum"] = sum(
        s["momentum_buffer"].numel() * s["momentum_buffer"].element_size() for s in state["optimizer"]["state"].values()
    )
    student_params = sum(p.numel() for k, p in method.state_dict().items() if k.startswith("student."))
    print(f"{args.config}: method {config.method.name}, student {student_params / 1e6:.2f} M tensors' elements\n")
    print("| part | MiB |")
    print("|---|---|")
    for name, n in parts.most_common():
        print(f"| {name} | {n / MIB:.2f} |")
    pieces = -(-size // int(PIECE_MIB * MIB))
    calls = -(-pieces // (CALL_MIB // PIECE_MIB))
    print(f"| **checkpoint file** | **{size / MIB:.2f}** ({size} bytes) |")
    print(f"\n{pieces} pieces of {PIECE_MIB} MiB; {calls} device calls of {CALL_MIB} MiB to carry it in or out")
    if args.checkpoint:
        _compression(Path(args.checkpoint))


if __name__ == "__main__":
    main()
