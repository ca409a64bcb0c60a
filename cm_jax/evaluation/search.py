"""`launch.py --mode=search`: the middle time point of two-step sampling with the lowest FID,
found by ternary search (the official code's `scripts/ternary_search.py` searches grid
indices the same way). Each point's FID is evaluate.py's, on fewer samples.
"""

import os
import time

import numpy as np
from absl import logging

from cm_jax import distributed
from cm_jax.evaluation import evaluate, fid
from cm_jax.train_state import create_mesh


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

    c, s, e = config.search, config.sample, config.eval
    ref_pool3, _ = evaluate.load_reference(e.ref_stats)
    mesh = create_mesh()
    extractor = evaluate.FeatureExtractor(mesh, e.inception_path or None, e.batch_size)
    gen = Generator(workdir, s.checkpoint_step or None, s.ema_rate or None, list(mesh.devices.flat))
    sigma_max = gen.grid["sigma_max"]
    count = {"done": 0}

    def sigmas_of(x):
        if c.kind == "index":
            return tuple(
                float(v)
                for v in gen.time_points(ts=(0, x, c.num_scales - 1), num_scales=c.num_scales)
            )
        return (sigma_max, float(np.exp(x)))

    def fid_of(x):
        images, _ = gen.sample(
            c.num_samples, sigmas=sigmas_of(x), seed=s.seed, batch_size=s.batch_size
        )
        stats = evaluate.ImageStats(evaluate.feature_metadata(extractor))
        stats.add(extractor, images)
        value = fid.fid_from_stats(stats.pool3, ref_pool3)
        count["done"] += 1
        logging.info(
            "search: point %d (%s -> sigmas %s): FID %.4f, %.0f s so far",
            count["done"],
            x,
            sigmas_of(x),
            value,
            time.perf_counter() - started,
        )
        return value

    started = time.perf_counter()

    if c.kind == "index":
        best, value, values = ternary_search(fid_of, 1, c.num_scales - 2, integer=True)
    elif c.kind == "sigma":
        best, value, values = ternary_search(
            fid_of, np.log(c.sigma_lo), np.log(c.sigma_hi), integer=False, iterations=c.iterations
        )
    else:
        raise ValueError(f"Unknown search.kind {c.kind!r}: use index or sigma.")
    common = {"kind": c.kind, "step": gen.step}
    rows = [
        {**common, "x": float(x), "sigmas": sigmas_of(x), "fid": v, "num_samples": c.num_samples}
        for x, v in sorted(values.items())
    ]
    rows.append({**common, "best": float(best), "sigmas": sigmas_of(best), "fid": value})
    if distributed.is_writer():
        evaluate.append_jsonl(os.path.join(workdir, "eval", "search.jsonl"), rows)
    logging.info("search: best %s (sigmas %s), FID %.4f", best, sigmas_of(best), value)
    return sigmas_of(best), value
