"""`launch.py --mode=stats` (reference statistics of a dataset split), `--mode=eval` (FID and
sFID of a run's samples, or of an npz of samples, against reference statistics), `--mode=search`
(the two-step time point with the lowest FID) and the FID hook of training (`train.fid_every`).

Features come from the Flax TF-Inception network (inception.py), sharded over all devices in
fixed-size batches (one compilation), and are accumulated in float64 as they arrive, so no
feature matrix is held in memory.
"""
import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import logging

from cm_jax import data
from cm_jax.evaluation import fid, inception
from cm_jax.train_state import batch_sharding, create_mesh, replicated

RESIZE_CONVENTION = "tf1_bilinear_299_no_half_pixel_centers"


class FeatureExtractor:
    """uint8 NHWC images -> Inception pool3 [N, 2048] and sFID spatial [N, 2023] features."""

    def __init__(self, mesh, params_path=None, batch_size=250):
        self.params_path = params_path or inception.default_params_path()
        params = inception.load_inception_params(self.params_path)
        self.params = jax.device_put(params, replicated(mesh))
        devices = mesh.devices.size
        self.batch_size = max(devices, batch_size // devices * devices)
        split = batch_sharding(mesh)
        self._fn = jax.jit(lambda params, images: inception.extract_features(params, images),
                           in_shardings=(replicated(mesh), split), out_shardings=split)

    def weights_sha1(self):
        with np.load(self.params_path) as f:
            return str(f["source_sha1"]) if "source_sha1" in f else "unknown"

    def features(self, images):
        """Features of uint8 images [N, H, W, C], padded to full batches so shapes never change."""
        pool3, spatial = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = np.asarray(images[start:start + self.batch_size])
            count = len(chunk)
            if count < self.batch_size:
                pad = np.zeros((self.batch_size - count,) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = jax.device_get(self._fn(self.params, chunk))
            pool3.append(out["pool3"][:count])
            spatial.append(out["spatial"][:count])
        return np.concatenate(pool3), np.concatenate(spatial)


class ImageStats:
    """Streaming statistics of pool3 (FID) and spatial (sFID) features."""

    def __init__(self, metadata):
        self.pool3 = fid.FeatureStats(metadata)
        self.spatial = fid.FeatureStats(metadata)

    def add(self, extractor, images):
        pool3, spatial = extractor.features(images)
        self.pool3.add(pool3)
        self.spatial.add(spatial)

    def save(self, path):
        """One npz: mu, sigma, n (pool3; the format of the shared CIFAR-10 statistics),
        mu_spatial, sigma_spatial, and meta_* strings."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        meta = {f"meta_{k}": np.array(v) for k, v in self.pool3.metadata.items()}
        np.savez(path, mu=self.pool3.mean, sigma=self.pool3.cov, n=self.pool3.n,
                 mu_spatial=self.spatial.mean, sigma_spatial=self.spatial.cov, **meta)

    def save_progress(self, prefix, done):
        """Both statistics in float64, written to temporary files and renamed, so a kill at
        any moment leaves either the previous or the new progress."""
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        self.pool3.metadata["done"] = str(done)
        for name, stats in (("spatial", self.spatial), ("pool3", self.pool3)):
            tmp = f"{prefix}.{name}.tmp.npz"
            stats.save(tmp)
            os.replace(tmp, f"{prefix}.{name}.npz")

    @classmethod
    def load_progress(cls, prefix):
        """(stats, samples done) from `save_progress`; a torn pair starts over."""
        stats = cls({})
        stats.pool3 = fid.FeatureStats.load(prefix + ".pool3.npz")
        stats.spatial = fid.FeatureStats.load(prefix + ".spatial.npz")
        if stats.pool3.n != stats.spatial.n:
            return cls(stats.pool3.metadata), 0
        return stats, int(stats.pool3.metadata.get("done", stats.pool3.n))


def sample_stats(gen, extractor, sample_config, num_samples, progress_path=None, chunk=0):
    """Statistics of num_samples samples of `gen`, made chunk by chunk (sample i always from
    noise index i, so chunks are independent of each other).

    With progress_path, the statistics so far are saved after every chunk and picked up again
    by a rerun (pre-emption safe); the file is removed when the last chunk is in.
    """
    s, chunk = sample_config, chunk or 10 * extractor.batch_size
    stats, done = ImageStats(_metadata(extractor)), 0
    if progress_path and os.path.exists(progress_path + ".pool3.npz"):
        stats, done = ImageStats.load_progress(progress_path)
        logging.info("eval: resuming after %d of %d samples", done, num_samples)
    for start in range(done, num_samples, chunk):
        count = min(chunk, num_samples - start)
        images, _ = gen.sample(count, sigmas=tuple(s.sigmas), ts=tuple(s.ts),
                               num_scales=s.num_scales, seed=s.seed, first_index=start,
                               batch_size=s.batch_size, edm_steps=s.edm_steps,
                               edm_solver=s.edm_solver)
        stats.add(extractor, images)
        if progress_path:
            stats.save_progress(progress_path, start + count)
    if progress_path:
        for suffix in (".pool3.npz", ".spatial.npz"):
            if os.path.exists(progress_path + suffix):
                os.remove(progress_path + suffix)
    return stats


def _run_tag(row, num_samples):
    """A file name that changes with everything the samples depend on."""
    key = json.dumps({k: row[k] for k in ("step", "ema_rate", "sigmas", "ts", "num_scales",
                                          "seed")} | {"n": num_samples}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _metadata(extractor, **extra):
    return {"inception_sha1": extractor.weights_sha1(), "resize": RESIZE_CONVENTION, **extra}


def run_stats(config, workdir):
    """--mode=stats: statistics of config.data's split (npz shards or tfds), written to
    config.eval.ref_stats_out (default workdir/eval/ref_<dataset>_<split>.npz)."""
    dataset = data.load_split(config.data)
    extractor = FeatureExtractor(create_mesh(), config.eval.inception_path or None,
                                 config.eval.batch_size)
    stats = ImageStats(_metadata(extractor, dataset=config.data.dataset, split=config.data.split,
                                 source=config.data.dir or "tfds"))
    chunk = 10 * extractor.batch_size
    for start in range(0, dataset.num_examples, chunk):
        stats.add(extractor, dataset.images[start:start + chunk])
        logging.info("stats: %d / %d images", min(start + chunk, dataset.num_examples),
                     dataset.num_examples)
    path = config.eval.ref_stats_out or os.path.join(
        workdir, "eval", f"ref_{config.data.dataset}_{config.data.split}.npz")
    stats.save(path)
    logging.info("Wrote %s (n = %d).", path, stats.pool3.n)
    return path


def _load_reference(path):
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"Reference statistics {path!r} not found: make them with "
                                f"--mode=stats or set --config.eval.ref_stats.")
    pool3 = fid.FeatureStats.load(path)
    with np.load(path) as f:
        spatial = (f["mu_spatial"], f["sigma_spatial"]) if "mu_spatial" in f else None
    return pool3, spatial


def run_eval(config, workdir):
    """--mode=eval: FID (and sFID where the reference has spatial statistics) of
    config.eval.num_samples samples of the run in workdir (time points from config.sample), or
    of the images in config.eval.samples_npz. Appends one JSON line to workdir/eval/metrics.jsonl.
    The Inception Score needs a 2048→1008 classifier that the FID weights lack: not reported."""
    from cm_jax.generate import Generator  # Only eval of a run needs the generator.
    e, s = config.eval, config.sample
    ref_pool3, ref_spatial = _load_reference(e.ref_stats)
    mesh = create_mesh()
    extractor = FeatureExtractor(mesh, e.inception_path or None, e.batch_size)
    stats = ImageStats(_metadata(extractor))
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ref_stats": e.ref_stats}
    start_time = time.perf_counter()
    if e.samples_npz:
        with np.load(e.samples_npz) as f:
            images = f["arr_0"] if "arr_0" in f else f["images"]
        stats.add(extractor, images)
        row["samples"] = e.samples_npz
    else:
        gen = Generator(workdir, s.checkpoint_step or None, s.ema_rate or None,
                        list(mesh.devices.flat))
        row.update(step=gen.step, ema_rate=s.ema_rate or gen.config.train.ema_rates[0],
                   sigmas=list(s.sigmas), ts=list(s.ts), num_scales=s.num_scales, seed=s.seed)
        progress = os.path.join(workdir, "eval", "partial", _run_tag(row, e.num_samples))
        stats = sample_stats(gen, extractor, s, e.num_samples, progress, e.chunk_size)
    row["num_samples"] = stats.pool3.n
    row["fid"] = fid.fid_from_stats(stats.pool3, ref_pool3)
    if ref_spatial is not None:
        row["sfid"] = fid.frechet_distance(stats.spatial.mean, stats.spatial.cov, *ref_spatial)
    row["inception_score"] = "unavailable: the FID Inception weights have no classifier"
    row["seconds"] = round(time.perf_counter() - start_time, 1)
    path = os.path.join(workdir, "eval", "metrics.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    logging.info("eval: %s", row)
    return row


def make_fid_hook(config):
    """(every, fn) for trainer.train_and_evaluate: every train.fid_every steps, the FID of
    train.fid_num_samples samples of the first evaluation EMA (time points from config.sample)
    against config.eval.ref_stats, logged as `fid`. Reads the reference and loads the network
    once, before training starts, so a bad path fails at once."""
    from cm_jax import models  # The trainer's network, rebuilt for sampling.
    from cm_jax.generate import Generator
    from cm_jax.train_state import ema_key
    ref_pool3, _ = _load_reference(config.eval.ref_stats)
    mesh = create_mesh()
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


# ---------------------------------------------------------------------- --mode=search
def ternary_search(objective, lo, hi, integer=True, iterations=12):
    """Minimise a unimodal objective on [lo, hi]; returns (best x, its value, {x: value}).

    integer=True: over the integers lo..hi, shrinking the bracket by a third per round, then
    trying what is left (as the official `ternary_search.py` does over grid indices).
    integer=False: `iterations` rounds on the real interval. Every value is computed once.
    """
    values = {}

    def f(x):
        if x not in values:
            values[x] = float(objective(x))
        return values[x]

    if integer:
        while hi - lo > 2:
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if f(m1) <= f(m2):
                hi = m2
            else:
                lo = m1
        candidates = range(lo, hi + 1)
    else:
        for _ in range(iterations):
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if f(m1) <= f(m2):
                hi = m2
            else:
                lo = m1
        candidates = [(lo + hi) / 2]
    for x in candidates:
        f(x)
    best = min(values, key=values.get)
    return best, values[best], values


def run_search(config, workdir):
    """--mode=search: the middle time point of two-step sampling that minimises FID.

    search.kind="index": ts = (0, m, N − 1) on the search.num_scales grid, m searched over the
    integers 1..N − 2 (the official scripts' search). search.kind="sigma": σ's (σ_max, σ),
    ternary search over ln σ in [search.sigma_lo, search.sigma_hi]. Each FID uses
    search.num_samples samples; every evaluation and the best go to workdir/eval/search.jsonl.
    """
    from cm_jax.generate import Generator
    c, s = config.search, config.sample
    ref_pool3, _ = _load_reference(config.eval.ref_stats)
    mesh = create_mesh()
    extractor = FeatureExtractor(mesh, config.eval.inception_path or None, config.eval.batch_size)
    gen = Generator(workdir, s.checkpoint_step or None, s.ema_rate or None, list(mesh.devices.flat))
    sigma_max = gen.grid["sigma_max"]

    def sigmas_of(x):
        if c.kind == "index":
            return tuple(float(v) for v in gen.time_points(ts=(0, x, c.num_scales - 1),
                                                          num_scales=c.num_scales))
        return (sigma_max, float(np.exp(x)))

    def fid_of(x):
        images, _ = gen.sample(c.num_samples, sigmas=sigmas_of(x), seed=s.seed,
                               batch_size=s.batch_size)
        stats = ImageStats(_metadata(extractor))
        stats.add(extractor, images)
        value = fid.fid_from_stats(stats.pool3, ref_pool3)
        logging.info("search: %s -> sigmas %s, FID %.4f", x, sigmas_of(x), value)
        return value

    if c.kind == "index":
        best, value, values = ternary_search(fid_of, 1, c.num_scales - 2, integer=True)
    elif c.kind == "sigma":
        best, value, values = ternary_search(fid_of, np.log(c.sigma_lo), np.log(c.sigma_hi),
                                             integer=False, iterations=c.iterations)
    else:
        raise ValueError(f"Unknown search.kind {c.kind!r}: use index or sigma.")
    path = os.path.join(workdir, "eval", "search.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for x, v in sorted(values.items()):
            f.write(json.dumps({"kind": c.kind, "x": float(x), "sigmas": sigmas_of(x),
                                "fid": v, "step": gen.step, "num_samples": c.num_samples})
                    + "\n")
        f.write(json.dumps({"kind": c.kind, "best": float(best), "sigmas": sigmas_of(best),
                            "fid": value, "step": gen.step}) + "\n")
    logging.info("search: best %s (sigmas %s), FID %.4f", best, sigmas_of(best), value)
    return sigmas_of(best), value
