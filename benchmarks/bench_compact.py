"""Compact dataset copies (crln data compact) against the field's h5 copy: size, load time, bit-exactness.

Usage: python benchmarks/bench_compact.py [--h5 ../shared/data/LA] [--compact data/LA_compact ...]
       [--repeats 5] [--formats 10]

Write the copies first, e.g.
    crln data compact --src ../shared/data/LA --dst data/LA_compact --max-part-mib 56
    crln data compact --src ../shared/data/LA --dst data/LA_compact_lzma --codec lzma --max-part-mib 58

Prints: bytes per copy (total, per case, training and test lists, parts); that every case decodes to
the h5 image bit for bit (and finite); the median time of a full pass that loads every case (one
warm-up pass, then ``--repeats`` passes, the copies interleaved so load changes hit all alike) and its
ratio to the h5 copy; and, on the first ``--formats`` cases, the size and decode time of alternative
containers for the same 8-bit index volumes (h5 gzip / lzf, numpy's compressed npz, with and without
the delta coding along H).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from crln.data.compact import CompactDataset, read_compact_case, value_table, write_compact_case
from crln.data.h5 import H5Dataset

MIB = 2**20


def _mib(n: float) -> str:
    return f"{n / MIB:.2f}"


def _bits(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image, dtype=np.float32).view(np.uint32)


def _sizes(name: str, root: Path, compact: CompactDataset, h5: H5Dataset) -> None:
    cases = compact.manifest["cases"]
    per_case = np.array([entry["bytes"] for entry in cases.values()], dtype=float)
    source = np.array([entry["source_bytes"] for entry in cases.values()], dtype=float)
    lists = {split: sum(cases[c]["bytes"] for c in h5.ids(split)) for split in h5.splits()}
    parts = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in sorted(root.glob("part*"))}
    print(
        f"| {name} ({compact.manifest['codec']}) | {_mib(per_case.sum())} | {_mib(per_case.sum() / len(per_case))} | "
        f"{_mib(per_case.min())} / {_mib(np.median(per_case))} / {_mib(per_case.max())} | "
        + "; ".join(f"{split}: {_mib(b)}" for split, b in lists.items())
        + f" | {', '.join(f'{k} {_mib(v)}' for k, v in parts.items()) or '-'} | {per_case.sum() / source.sum():.2f} |"
    )


def _pass(load, ids: list[str]) -> float:
    start = time.perf_counter()
    for cid in ids:
        load(cid)
    return time.perf_counter() - start


def _containers(h5: H5Dataset, ids: list[str], repeats: int) -> None:
    """Size and decode time (image and label) of candidate containers for the same 8-bit index volumes."""

    def h5_index(path: Path, index: np.ndarray, table: np.ndarray, label: np.ndarray, **kw) -> None:
        with h5py.File(path, "w") as f:
            f.create_dataset("table", data=table)
            f.create_dataset("index", data=index, **kw)
            f.create_dataset("label", data=label, **kw)

    def read_h5_index(path: Path) -> np.ndarray:
        with h5py.File(path, "r") as f:
            _ = f["label"][()]
            return f["table"][()][f["index"][()]]

    def read_npz(path: Path, delta: bool) -> np.ndarray:
        with np.load(path) as z:
            _ = z["label"]
            index = np.cumsum(z["index"], axis=0, dtype=np.uint8) if delta else z["index"]
            return z["table"][index]

    gzip4 = {"compression": "gzip", "compression_opts": 4}
    candidates = {
        "h5 gzip-4 (h5py default level), index": (
            lambda p, i, t, lab: h5_index(p, i, t, lab, chunks=i.shape, **gzip4),
            read_h5_index,
        ),
        "h5 lzf, index": (
            lambda p, i, t, lab: h5_index(p, i, t, lab, compression="lzf", chunks=i.shape),
            read_h5_index,
        ),
        "npz deflate (savez_compressed), index": (
            lambda p, i, t, lab: np.savez_compressed(p, index=i, table=t, label=lab),
            lambda p: read_npz(p, False),
        ),
        "npz deflate, delta-coded index": (
            lambda p, i, t, lab: np.savez_compressed(
                p, index=np.diff(i, axis=0, prepend=np.uint8(0)), table=t, label=lab
            ),
            lambda p: read_npz(p, True),
        ),
    }
    rows: dict[str, list[tuple[int, float]]] = {name: [] for name in [*candidates, "crln zlib", "crln lzma"]}
    with tempfile.TemporaryDirectory() as tmp:
        for cid in ids:
            case = h5.load(cid)
            table, index = value_table(case.image)
            paths = {}
            for name, (write, read) in candidates.items():
                path = Path(tmp) / f"{len(paths)}.{'npz' if 'npz' in name else 'h5'}"
                write(path, index, table, case.label)
                paths[name] = (path, read)
            for codec in ("zlib", "lzma"):
                path = Path(tmp) / f"{codec}.npz"
                write_compact_case(path, case, codec)
                paths[f"crln {codec}"] = (path, lambda p: read_compact_case(p).image)
            for name, (path, read) in paths.items():
                assert np.array_equal(_bits(read(path)), _bits(case.image)), name
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    read(path)
                    times.append(time.perf_counter() - start)
                rows[name].append((path.stat().st_size, statistics.median(times)))
    source = np.mean([h5.path(cid).stat().st_size for cid in ids])
    print(f"\nContainers of the 8-bit index volume, first {len(ids)} cases (h5 source: {_mib(source)} MiB/case):\n")
    print("| container (image + label) | MiB/case | decode ms/case (median) |")
    print("|---|---|---|")
    for name, values in rows.items():
        sizes, times = zip(*values)
        print(f"| {name} | {_mib(np.mean(sizes))} | {1e3 * np.mean(times):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h5", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))
    parser.add_argument("--compact", nargs="+", default=["data/LA_compact"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", type=int, default=10, help="cases for the container comparison (0 = skip)")
    args = parser.parse_args()

    h5 = H5Dataset(args.h5, cache=False)
    ids = list(dict.fromkeys(cid for split in h5.splits() for cid in h5.ids(split)))
    compacts = {Path(c).name: (Path(c), CompactDataset(c)) for c in args.compact}
    h5_bytes = np.array([h5.path(cid).stat().st_size for cid in ids], dtype=float)
    print(f"cases: {len(ids)}; h5 copy {_mib(h5_bytes.sum())} MiB, {_mib(h5_bytes.mean())} MiB/case\n")
    print("| copy | MiB | MiB/case | min / median / max | per list (MiB) | parts (MiB) | x h5 |")
    print("|---|---|---|---|---|---|---|")
    for name, (root, compact) in compacts.items():
        _sizes(name, root, compact, h5)

    encodings = {name: {e["encoding"] for e in c.manifest["cases"].values()} for name, (_, c) in compacts.items()}
    for name, (_, compact) in compacts.items():  # the warm-up pass doubles as the bit-exactness check
        for cid in ids:
            a, b = h5.load(cid), compact.load(cid)
            assert np.array_equal(_bits(a.image), _bits(b.image)) and np.array_equal(a.label, b.label), (name, cid)
            assert np.isfinite(b.image).all(), (name, cid)
        print(
            f"\n{name}: all {len(ids)} cases bit-identical to the h5 copy, finite; encodings {sorted(encodings[name])}"
        )

    loaders = {"h5 (h5py, gzip float32)": h5.load, **{name: c.load for name, (_, c) in compacts.items()}}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.repeats):
        for name, load in loaders.items():
            times[name].append(_pass(load, ids))
    reference = statistics.median(times["h5 (h5py, gzip float32)"])
    print(f"\nLoad every case ({len(ids)}), median of {args.repeats} passes after a warm-up pass:\n")
    print("| copy | s/pass | ms/case | speed-up vs h5 |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {1e3 * median / len(ids):.1f} | {reference / median:.2f}x |")

    if args.formats:
        _containers(h5, ids[: args.formats], args.repeats)


if __name__ == "__main__":
    main()
