"""Where metrics and images go: clu metric writers, a JSON-lines file, PNG grids.

clu's `metric_writers` imports TensorFlow for its TensorBoard writer. Where TensorFlow is
installed, scalars go to TensorBoard events and the console through clu; where it is not (the
GPU image, a slim install), they go to the console through absl logging. Every run also appends
to `workdir/metrics.jsonl`, which needs nothing and is easy to parse.
"""

import json
import math
import os

import jax
import numpy as np
from absl import logging
from PIL import Image


class JsonlWriter:
    """Appends one JSON object per write: {"step": k, name: value, ...}."""

    def __init__(self, path):
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step, scalars):
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class ConsoleWriter:
    """Scalars to absl logging, for machines without TensorFlow."""

    def write_scalars(self, step, scalars):
        logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

    def flush(self):
        pass

    def close(self):
        pass


class MultiWriter:
    def __init__(self, writers):
        self._writers = writers

    def write_scalars(self, step, scalars):
        for w in self._writers:
            w.write_scalars(step, scalars)

    def flush(self):
        for w in self._writers:
            w.flush()

    def close(self):
        for w in self._writers:
            w.close()


def create_writer(workdir):
    """JSONL + (TensorBoard and console via clu, or console alone). Only process 0 writes files."""
    if jax.process_index() > 0:
        return MultiWriter([])
    writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    try:
        from clu import metric_writers  # Imports TensorFlow.
    except ImportError:
        writers.append(ConsoleWriter())
    else:
        writers.append(
            metric_writers.create_default_writer(
                os.path.join(workdir, "tensorboard"), asynchronous=False
            )
        )
    return MultiWriter(writers)


def image_grid(images_uint8, num_columns=None):
    """Tile [N, H, W, C] uint8 images into one [rows·H, cols·W, C] image (blank cells black)."""
    n, h, w, c = images_uint8.shape
    cols = num_columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = images_uint8[k]
    return grid


def save_image_grid(images_uint8, path, num_columns=None):
    grid = image_grid(np.asarray(images_uint8), num_columns)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)
