"""Input-pipeline throughput and memory when training streams ArrayRecord data (issue 15.3).

    python benchmarks/data_throughput.py --num_images=200000,20000 --sizes=64,256 \\
        --workers=1,2,4 --dir=/tmp/cm_jax_data_throughput

For each image size it writes a synthetic ArrayRecord set with `cm_jax.convert_data` (the
images are smooth random fields plus noise, so PNG has about the work and the compression it
has on photographs rather than on pure noise), and a 1k-image set of the same kind. Then, each
in a fresh process so that peak memory is its own, it iterates `input_pipeline.TrainIterator`
over the set exactly as the trainer does (a 1-device sharding, random flips, no model) and reports
images/s per host and the peak resident memory, for each number of decode threads
(`config.data.num_workers`). The 1k-image run is the memory baseline: streaming should cost
the same memory whatever the dataset size (goal: under 1 GB above it). One JSON line per
measurement goes to --out, and a table to stdout.

The sets stay in --dir (default: a temporary folder, removed at the end) and a re-run
reuses them after verifying them (the converter's resume).
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_jax import convert_data  # noqa: E402

BASELINE_IMAGES = 1000


def synthetic_image(index: int, size: int) -> np.ndarray:
    """A smooth random field (an 8x8 grid of colours, bicubic-upsampled) plus noise."""
    from PIL import Image

    rng = np.random.default_rng(index)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.int16)
    noise = rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def synthetic_source(num_images: int, size: int) -> convert_data.Source:
    items = lambda: (
        convert_data.SourceItem(f"synthetic {i}", i % 1000, lambda i=i: synthetic_image(i, size))
        for i in range(num_images)
    )
    return convert_data.Source(f"synthetic {size}x{size}", num_images, 1000, None, items)


def build(folder: str, num_images: int, size: int, encoding: str) -> dict:
    """The synthetic set in `folder` (written, or verified and reused)."""
    settings = convert_data.Settings(image_size=size, encoding=encoding, shard_size=10_000)
    start = time.perf_counter()
    metadata = convert_data.convert(synthetic_source(num_images, size), folder, settings)
    megabytes = sum(shard["bytes"] for shard in metadata["shards"]) / 2**20
    print(f"{folder}: {megabytes:.0f} MiB on disk, {time.perf_counter() - start:.0f} s")
    return {"disk_mib": round(megabytes)}


def measure(folder: str, size: int, workers: int, batch: int, seconds: float) -> dict:
    """Run in a child process: iterate the TrainIterator over `folder` for `seconds`."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from cm_jax import data, input_pipeline

    config = types.SimpleNamespace(
        dataset="", dir=folder, split="train", image_size=size, num_channels=3, num_workers=workers
    )
    dataset = data.load_split(config)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))
    iterator = input_pipeline.TrainIterator(dataset, batch, sharding, 0, seed=0, random_flip=True)
    with iterator as batches:
        for _ in range(2):  # warm-up: thread start, first compile of the transfer
            next(batches)[1]["image"].block_until_ready()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            next(batches)[1]["image"].block_until_ready()
            steps += 1
        elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"images_per_s": round(steps * batch / elapsed), "peak_rss_mib": round(peak_mib)}


def measure_in_child(folder, size, workers, batch, seconds) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure", folder]
    command += [f"--sizes={size}", f"--workers={workers}", f"--batch={batch}"]
    command += [f"--seconds={seconds}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = (
        "| size | encoding | images | disk MiB | workers | images/s | peak RSS MiB | above 1k |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(
            f"| {row['size']}² | {row['encoding']} | {row['num_images']:,} | {row['disk_mib']:,} "
            f"| {row['workers']} | {row['images_per_s']:,} | {row['peak_rss_mib']:,} | "
            f"{row['rss_above_baseline_mib']:+,} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", default="200000,20000", help="per size, comma-separated")
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--encoding", default="png", choices=("png", "raw"))
    parser.add_argument("--batch", type=int, default=256, help="rows per host per step")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed per measurement")
    parser.add_argument("--dir", default="", help="where the sets go (default: a temp dir)")
    parser.add_argument("--out", default="data_throughput.jsonl")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    if args.measure:
        result = measure(args.measure, sizes[0], workers[0], args.batch, args.seconds)
        print(json.dumps(result))
        return
    counts = [int(n) for n in args.num_images.split(",")]
    counts += counts[-1:] * (len(sizes) - len(counts))
    rows = []
    with contextlib.ExitStack() as stack:
        root = args.dir or stack.enter_context(tempfile.TemporaryDirectory())
        for size, count in zip(sizes, counts):
            for worker_count in workers:
                rows.append(run_one(root, size, count, worker_count, args))
                print(json.dumps(rows[-1]), flush=True)
                with open(args.out, "a") as out:
                    out.write(json.dumps(rows[-1]) + "\n")
    print_table(rows)


def run_one(root: str, size: int, count: int, workers: int, args) -> dict:
    """One table row: the set of `count` images and the 1k baseline, measured alike."""
    folders = {
        n: os.path.join(root, f"{size}px_{n}_{args.encoding}") for n in (count, BASELINE_IMAGES)
    }
    disk = {n: build(folder, n, size, args.encoding) for n, folder in folders.items()}
    runs = {
        n: measure_in_child(folder, size, workers, args.batch, args.seconds)
        for n, folder in folders.items()
    }
    row = dict(size=size, encoding=args.encoding, num_images=count, workers=workers)
    row.update(batch=args.batch, **disk[count], **runs[count])
    row["rss_above_baseline_mib"] = (
        runs[count]["peak_rss_mib"] - runs[BASELINE_IMAGES]["peak_rss_mib"]
    )
    row["baseline_images_per_s"] = runs[BASELINE_IMAGES]["images_per_s"]
    return row


if __name__ == "__main__":
    main()
