"""`launch.py --mode=stats` (reference statistics of a dataset split), `--mode=eval` (FID,
sFID, precision/recall, KID and Inception Score of a run's samples, or of an npz of samples,
against a reference) and the FID hook of training (`train.fid_every`); `--mode=search`
(search.py) measures its FIDs with the same pieces.

Features come from the Flax TF-Inception network (inception.py), sharded over all devices in
fixed-size batches (one compilation), and are accumulated in float64 as they arrive. FID and
sFID need nothing more; precision/recall and KID compare individual features, so --mode=stats
also writes the reference's pool3 features to a companion file (`<stats>_pool3.npy`), and eval
keeps the samples' pool3 features when the reference has them or an IS classifier is given.

On several processes every process samples and extracts its share of each batch and gets
all the features back; process 0 alone writes files. Long work reports its progress
(progress.py), and --mode=eval adds its metrics to the run's TensorBoard at the run's step.
"""

import glob
import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import logging

from cm_jax import data, distributed, metric_logging, progress
from cm_jax.evaluation import classifier, fid, inception
from cm_jax.train_state import batch_sharding, config_mesh, create_mesh, replicated

RESIZE_CONVENTION = "tf1_bilinear_299_no_half_pixel_centers"
PR_NEIGHBOURS = 3  # k of precision/recall, as guided-diffusion's evaluator
IS_SPLITS = 10
NO_REFERENCE_FEATURES = (
    "unavailable: the reference has no pool3 features; rerun --mode=stats "
    "(eval.ref_features_max > 0) to write them"
)
NO_CLASSIFIER = (
    "unavailable: set eval.classifier_path to pytorch-fid's "
    f"{classifier.PYTORCH_FID_FILE} (or its npz from "
    f"`{classifier.CONVERT_COMMAND}`)"
)


class FeatureExtractor:
    """uint8 NHWC images -> Inception pool3 [N, 2048] and sFID spatial [N, 2023] features."""

    def __init__(self, mesh, params_path=None, batch_size=250):
        self.params_path = params_path or inception.default_params_path()
        params = inception.load_inception_params(self.params_path)
        self.mesh = mesh
        self.params = jax.device_put(params, replicated(mesh))
        devices = mesh.devices.size
        self.batch_size = max(devices, batch_size // devices * devices)
        split = batch_sharding(mesh)
        self._fn = jax.jit(
            lambda params, images: inception.extract_features(params, images),
            in_shardings=(replicated(mesh), split),
            out_shardings=split,
        )

    def weights_sha1(self):
        with np.load(self.params_path) as f:
            return str(f["source_sha1"]) if "source_sha1" in f else "unknown"

    def features(self, images):
        """Features of uint8 images [N, H, W, C], padded to full batches so shapes never change;
        the batches are split over every device (of every process) and every process gets all
        the features."""
        pool3, spatial = [], []
        split = batch_sharding(self.mesh)
        for start in range(0, len(images), self.batch_size):
            chunk = np.asarray(images[start : start + self.batch_size])
            count = len(chunk)
            if count < self.batch_size:
                pad = np.zeros((self.batch_size - count,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = self._fn(self.params, distributed.to_global(chunk, split))
            pool3.append(distributed.to_host(out["pool3"])[:count])
            spatial.append(distributed.to_host(out["spatial"])[:count])
        return np.concatenate(pool3), np.concatenate(spatial)


class ImageStats:
    """Streaming statistics of pool3 (FID) and spatial (sFID) features and, with
    keep_features, the pool3 features themselves (precision/recall, KID and IS need each one),
    as float32 chunks: one per `add`."""

    def __init__(self, metadata, keep_features=False):
        self.pool3 = fid.FeatureStats(metadata)
        self.spatial = fid.FeatureStats(metadata)
        self.kept = [] if keep_features else None
        self._kept_saved = 0  # chunks of `kept` already in the progress files

    def add(self, extractor, images):
        """Adds the images' features; returns their pool3 features."""
        pool3, spatial = extractor.features(images)
        self.pool3.add(pool3)
        self.spatial.add(spatial)
        if self.kept is not None:
            self.kept.append(np.asarray(pool3, np.float32))
        return pool3

    @property
    def features(self):
        """The kept pool3 features, float32 [n, 2048]."""
        return np.concatenate(self.kept)

    def save(self, path):
        """One npz: mu, sigma, n (pool3; the format of the shared CIFAR-10 statistics),
        mu_spatial, sigma_spatial, and meta_* strings."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        meta = {f"meta_{k}": np.array(v) for k, v in self.pool3.metadata.items()}
        np.savez(
            path,
            mu=self.pool3.mean,
            sigma=self.pool3.cov,
            n=self.pool3.n,
            mu_spatial=self.spatial.mean,
            sigma_spatial=self.spatial.cov,
            **meta,
        )

    def save_progress(self, prefix, done):
        """Both statistics in float64 and the kept feature chunks not yet saved (one npy per
        chunk, named by its first sample), each written to a temporary file and renamed. The
        pool3 statistics, which record `done`, go last: a kill at any moment leaves either the
        previous or the new progress. Process 0 writes; every process keeps the same state."""
        if not distributed.is_writer():
            self._kept_saved = len(self.kept or [])
            return
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        if self.kept is not None:
            offset = sum(len(chunk) for chunk in self.kept[: self._kept_saved])
            for chunk in self.kept[self._kept_saved :]:
                _save_npy(_feature_chunk_path(prefix, offset), chunk)
                offset += len(chunk)
            self._kept_saved = len(self.kept)
        self.pool3.metadata["done"] = str(done)
        for name, stats in (("spatial", self.spatial), ("pool3", self.pool3)):
            tmp = f"{prefix}.{name}.tmp.npz"
            stats.save(tmp)
            os.replace(tmp, f"{prefix}.{name}.npz")

    @classmethod
    def load_progress(cls, prefix, keep_features=False):
        """(stats, samples done) from `save_progress`; a torn pair, or kept features missing
        (e.g. an earlier run that did not keep them), starts over."""
        stats = cls({}, keep_features)
        stats.pool3 = fid.FeatureStats.load(prefix + ".pool3.npz")
        stats.spatial = fid.FeatureStats.load(prefix + ".spatial.npz")
        done = int(stats.pool3.metadata.get("done", stats.pool3.n))
        if keep_features:
            stats.kept = _load_feature_chunks(prefix, done)
            stats._kept_saved = len(stats.kept or [])
            if stats.kept is None:
                logging.warning("eval: no saved features for the progress in %s", prefix)
        if stats.pool3.n != stats.spatial.n or (keep_features and stats.kept is None):
            return cls(stats.pool3.metadata, keep_features), 0
        return stats, done

    @staticmethod
    def remove_progress(prefix):
        """Removes what `save_progress` wrote (and any temporary file a kill left)."""
        if not distributed.is_writer():
            return
        escaped = glob.escape(prefix)
        for path in glob.glob(escaped + ".*.npz") + glob.glob(escaped + ".features.*.npy"):
            os.remove(path)


def _save_npy(path, array):
    tmp = path[: -len(".npy")] + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _feature_chunk_path(prefix, first_sample):
    return f"{prefix}.features.{first_sample:09d}.npy"


def _load_feature_chunks(prefix, done):
    """The saved chunks of kept features that cover samples 0..done-1, or None if they
    do not (a chunk missing, or one written after the statistics were last saved)."""
    chunks, offset = [], 0
    while offset < done:
        path = _feature_chunk_path(prefix, offset)
        if not os.path.exists(path):
            return None
        chunks.append(np.load(path))
        offset += len(chunks[-1])
    return chunks if offset == done else None


def sample_stats(
    gen, extractor, sample_config, num_samples, progress_path=None, chunk=0, keep_features=False
):
    """Statistics (and with keep_features the pool3 features) of num_samples samples of `gen`
    (sampled as its sample_config says), made chunk by chunk (sample i always from noise index
    i, so chunks are independent of each other).

    With progress_path, the statistics and features so far are saved after every chunk and
    picked up again by a rerun (pre-emption safe); the files are removed when the last chunk
    is in.
    """
    s, chunk = sample_config, chunk or 10 * extractor.batch_size
    stats, done = ImageStats(feature_metadata(extractor), keep_features), 0
    if progress_path and os.path.exists(progress_path + ".pool3.npz"):
        stats, done = ImageStats.load_progress(progress_path, keep_features)
        logging.info("eval: resuming after %d of %d samples", done, num_samples)
    with progress.Progress(num_samples, "img", "eval: sampling + features", done) as bar:
        for start in range(done, num_samples, chunk):
            count = min(chunk, num_samples - start)
            images, _ = gen.sample(count, seed=s.seed, first_index=start, batch_size=s.batch_size)
            stats.add(extractor, images)
            if progress_path:
                stats.save_progress(progress_path, start + count)
            bar.update(count)
    if progress_path:
        ImageStats.remove_progress(progress_path)
    return stats


def _run_tag(row, num_samples):
    """A file name that changes with everything the samples depend on."""
    key = json.dumps(
        {k: row[k] for k in ("step", "ema_rate", "sampler", "seed")} | {"n": num_samples},
        sort_keys=True,
    )
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def feature_metadata(extractor, **extra):
    """What a statistics file records of how its features were made: the Inception weights'
    hash and the resize convention, plus `extra`."""
    return {"inception_sha1": extractor.weights_sha1(), "resize": RESIZE_CONVENTION, **extra}


def reference_features_path(stats_path):
    """The companion of a reference statistics npz that holds its pool3 features."""
    return os.path.splitext(stats_path)[0] + "_pool3.npy"


def run_stats(config, workdir):
    """--mode=stats: statistics of config.data's split (npz shards or tfds), written to
    config.eval.ref_stats_out (default workdir/eval/ref_<dataset>_<split>.npz), and the pool3
    features of its first config.eval.ref_features_max images, float32, beside them
    (`reference_features_path`). The features go to a memory-mapped file as they come."""
    dataset = data.load_split(config.data)
    extractor = FeatureExtractor(
        create_mesh(), config.eval.inception_path or None, config.eval.batch_size
    )
    stats = ImageStats(
        feature_metadata(
            extractor,
            dataset=config.data.dataset,
            split=config.data.split,
            source=config.data.dir or "tfds",
        )
    )
    path = config.eval.ref_stats_out or os.path.join(
        workdir, "eval", f"ref_{config.data.dataset}_{config.data.split}.npz"
    )
    features_path = reference_features_path(path)
    partial = features_path[: -len(".npy")] + ".partial.npy"
    keep = min(max(int(config.eval.ref_features_max), 0), dataset.num_examples)
    writer = distributed.is_writer()
    kept = None
    if writer:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if keep:
            shape = (keep, classifier.POOL3_DIM)
            kept = np.lib.format.open_memmap(partial, "w+", np.float32, shape)
    chunk = 10 * extractor.batch_size
    with progress.Progress(dataset.num_examples, "img", "stats: features") as bar:
        for start in range(0, dataset.num_examples, chunk):
            pool3 = stats.add(extractor, dataset.images[start : start + chunk])
            if kept is not None and start < keep:
                rows = pool3[: keep - start]
                kept[start : start + len(rows)] = rows
            bar.update(min(chunk, dataset.num_examples - start))
    stats.pool3.metadata["pool3_features"] = str(keep)
    if not writer:
        return path
    if keep:
        kept.flush()
        del kept
        os.replace(partial, features_path)
    elif os.path.exists(features_path):
        os.remove(features_path)  # It belongs to earlier statistics at this path.
    stats.save(path)
    logging.info("Wrote %s (n = %d) and the features of %d images.", path, stats.pool3.n, keep)
    return path


def load_reference(path):
    """(pool3 FeatureStats, (mu, sigma) of the spatial features or None) of a reference
    statistics npz, checked whole before anything is sampled: a missing, damaged or foreign
    file is one error naming it."""
    if not path:
        raise ValueError(
            "eval.ref_stats is empty: make reference statistics with --mode=stats, or give "
            "--config.eval.ref_stats (e.g. shared/data/cifar10_fid/cifar10_train_tf_inception.npz)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Reference statistics {path!r} not found: make them with "
            f"--mode=stats or set --config.eval.ref_stats."
        )
    dim = classifier.POOL3_DIM
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = sorted({"mu", "sigma", "n"} - set(f.files))
            if missing:
                raise ValueError(
                    f"{path} lacks {missing} (it has {sorted(f.files)}): it is not reference "
                    "statistics; --mode=stats writes them."
                )
            shapes = (f["mu"].shape, f["sigma"].shape)
            spatial = (f["mu_spatial"], f["sigma_spatial"]) if "mu_spatial" in f.files else None
    except ValueError:
        raise
    except Exception as e:  # BadZipFile, EOFError, OSError: a damaged or foreign file.
        raise ValueError(
            f"{path} is not a readable npz file ({type(e).__name__}); is it damaged?"
        ) from e
    if shapes != ((dim,), (dim, dim)):
        raise ValueError(
            f"{path} holds statistics of shapes {shapes}, not those of the Inception network's "
            f"{dim}-dimensional pool3 features; make them with --mode=stats."
        )
    return fid.FeatureStats.load(path), spatial


def _load_reference_features(path, ref_pool3):
    """The reference's pool3 features (memory-mapped), or None where it has none."""
    features_path = reference_features_path(path)
    if not os.path.isfile(features_path):
        return None
    features = np.load(features_path, mmap_mode="r")
    count = ref_pool3.metadata.get("pool3_features")
    if (
        features.ndim != 2
        or features.shape[1] != ref_pool3.mean.shape[0]
        or (count is not None and int(count) != len(features))
    ):
        raise ValueError(
            f"{features_path} (shape {features.shape}) does not belong to {path} "
            f"({count} features of dimension {ref_pool3.mean.shape[0]}): rerun "
            f"--mode=stats"
        )
    return features


def _manifold_metrics(features, ref_features):
    """Precision and recall (k = 3) and KID of the samples against the reference features."""
    if ref_features is None:
        return {"precision_recall": NO_REFERENCE_FEATURES, "kid": NO_REFERENCE_FEATURES}
    if min(len(features), len(ref_features)) <= PR_NEIGHBOURS:
        too_few = f"unavailable: needs more than {PR_NEIGHBOURS} samples and reference features"
        return {"precision_recall": too_few, "kid": too_few}
    precision, recall = fid.precision_recall(ref_features, features, k=PR_NEIGHBOURS)
    kid, kid_std = fid.kernel_inception_distance(ref_features, features)
    return {
        "precision": precision,
        "recall": recall,
        "kid": kid,
        "kid_std": kid_std,
        "ref_features": len(ref_features),
    }


def _inception_score(features, weight):
    """Inception Score over 10 splits, with the classifier W (None: not given)."""
    if weight is None:
        return {"inception_score": NO_CLASSIFIER}
    if len(features) < IS_SPLITS:
        return {
            "inception_score": f"unavailable: {IS_SPLITS} splits need at least {IS_SPLITS} samples"
        }
    mean, std = classifier.inception_score(features, weight, IS_SPLITS)
    return {"inception_score": mean, "inception_score_std": std}


def _npz_images(path):
    """The images of an npz of samples (arr_0 or images), checked before anything runs."""
    try:
        with np.load(path, allow_pickle=False) as f:
            key = "arr_0" if "arr_0" in f.files else "images"
            if key not in f.files:
                raise ValueError(f"{path} has neither `arr_0` nor `images` (it has {f.files}).")
            images = f[key]
    except ValueError:
        raise
    except Exception as e:  # Missing, damaged or foreign file.
        raise ValueError(f"eval.samples_npz={path}: cannot read it ({type(e).__name__}).") from e
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{path}: samples must be uint8 [N, H, W, C], got {images.dtype} {images.shape}."
        )
    return images


def _npz_stats(images, extractor, keep_features):
    """Statistics (and features) of the images of an npz."""
    stats = ImageStats(feature_metadata(extractor), keep_features)
    chunk = 10 * extractor.batch_size
    with progress.Progress(len(images), "img", "eval: features") as bar:
        for start in range(0, len(images), chunk):
            stats.add(extractor, images[start : start + chunk])
            bar.update(min(chunk, len(images) - start))
    return stats


def _sampled_stats(config, workdir, mesh, extractor, row, keep_features):
    """Statistics (and features) of eval.num_samples samples of the run in workdir, saved
    after every chunk under workdir/eval/partial; what the samples depend on goes into row."""
    from cm_jax.generate import Generator  # Only eval of a run needs the generator.

    e, s = config.eval, config.sample
    devices = list(mesh.devices.flat)
    gen = Generator(workdir, s.checkpoint_step or None, s.ema_rate or None, devices, s)
    row.update(
        step=gen.step,
        ema_rate=s.ema_rate or gen.config.train.ema_rates[0],
        sampler=str(gen.sampler()),
        seed=s.seed,
    )
    progress_path = os.path.join(workdir, "eval", "partial", _run_tag(row, e.num_samples))
    return sample_stats(
        gen, extractor, s, e.num_samples, progress_path, e.chunk_size, keep_features
    )


# The metrics --mode=eval adds to the run's TensorBoard, at the step of the checkpoint it scored.
TENSORBOARD_METRICS = ("fid", "sfid", "precision", "recall", "kid", "inception_score")


def run_eval(config, workdir):
    """--mode=eval: FID, sFID (where the reference has spatial statistics), precision/recall
    and KID (where it has pool3 features) and the Inception Score (with eval.classifier_path)
    of config.eval.num_samples samples of the run in workdir (time points from config.sample),
    or of the images in config.eval.samples_npz. A metric that cannot be computed gets a
    string saying why. Appends one JSON line to workdir/eval/metrics.jsonl."""
    e = config.eval
    ref_pool3, ref_spatial = load_reference(e.ref_stats)
    ref_features = _load_reference_features(e.ref_stats, ref_pool3)
    # Read before any sampling, so a bad file fails at once.
    weight = classifier.load_classifier(e.classifier_path) if e.classifier_path else None
    keep_features = ref_features is not None or weight is not None
    images = _npz_images(e.samples_npz) if e.samples_npz else None
    mesh = create_mesh()
    extractor = FeatureExtractor(mesh, e.inception_path or None, e.batch_size)
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ref_stats": e.ref_stats}
    start_time = time.perf_counter()
    if images is not None:
        stats = _npz_stats(images, extractor, keep_features)
        row["samples"] = e.samples_npz
    else:
        stats = _sampled_stats(config, workdir, mesh, extractor, row, keep_features)
    row["num_samples"] = stats.pool3.n
    row["fid"] = fid.fid_from_stats(stats.pool3, ref_pool3)
    if ref_spatial is not None:
        row["sfid"] = fid.frechet_distance(stats.spatial.mean, stats.spatial.cov, *ref_spatial)
    features = stats.features if keep_features else None
    row.update(_manifold_metrics(features, ref_features))
    row.update(_inception_score(features, weight))
    if e.classifier_path:
        row["classifier"] = e.classifier_path
    row["seconds"] = round(time.perf_counter() - start_time, 1)
    logging.info("eval: %s", row)
    if distributed.is_writer():
        append_jsonl(os.path.join(workdir, "eval", "metrics.jsonl"), [row])
        if "step" in row:  # Scored a checkpoint: beside its training curves.
            scalars = {k: row[k] for k in TENSORBOARD_METRICS if k in row}
            metric_logging.write_eval_scalars(workdir, row["step"], scalars)
    return row


def append_jsonl(path, rows):
    """Appends `rows` to the JSON-lines file `path` (one row per line), making its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_fid_hook(config):
    """(every, fn) for trainer.train_and_evaluate: every train.fid_every steps, the FID of
    train.fid_num_samples samples of the first evaluation EMA (time points from config.sample)
    against config.eval.ref_stats, logged as `fid`. Reads the reference and loads the network
    once, before training starts, so a bad path fails at once."""
    from cm_jax import models  # The trainer's network, rebuilt for sampling.
    from cm_jax.generate import Generator
    from cm_jax.train_state import ema_key

    ref_pool3, _ = load_reference(config.eval.ref_stats)
    mesh = config_mesh(config)  # The training run's: its EMA is sampled where it lives.
    extractor = FeatureExtractor(mesh, config.eval.inception_path or None, config.eval.batch_size)
    net = models.create_model(config.model)
    rate, s = config.train.ema_rates[0], config.sample

    def fid_of(step, state):
        gen = Generator.from_params(config, net, state.ema_params[ema_key(rate)], mesh, step)
        stats = sample_stats(gen, extractor, s, config.train.fid_num_samples)
        value = fid.fid_from_stats(stats.pool3, ref_pool3)
        logging.info("step %d: FID %.4f (%d samples, EMA %s)", step, value, stats.pool3.n, rate)
        return {"fid": value}

    return config.train.fid_every, fid_of
