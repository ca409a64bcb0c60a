"""Training throughput: images/s of the real train step (loss, gradient, optimizer, EMAs).

    python benchmarks/train_throughput.py --recipes ict,ct --dtypes bfloat16,float32 --batch 512

For each recipe and compute dtype it builds the paper config's model and the jitted, sharded
train step exactly as `launch.py` does, feeds it through the real input pipeline (a synthetic
in-memory dataset of random images, so no data files are needed), and reports compile time,
milliseconds per step, images/s, the FLOPs per step (XLA's count on the HLO) and the achieved
TFLOP/s. One JSON
line per measurement goes to --out. `--tiny` swaps in the CPU test model, to check the script.
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_jax import data, models, optim, train_state, trainer  # noqa: E402
from configs import cifar10_ct, cifar10_edm, cifar10_ict, common  # noqa: E402

RECIPES = {"ct": cifar10_ct, "ict": cifar10_ict, "edm": cifar10_edm}


def recipe_config(recipe, dtype, batch, tiny):
    config = RECIPES[recipe].get_config()
    if recipe == "ct":
        config.loss.distance = "l2"  # LPIPS arrives with CD (issue 5); l2 is the paper's CT-l2.
    if tiny:
        config.model = common.tiny_ncsnpp()
    config.model.dtype = dtype
    config.train.batch_size = batch
    return config


def measure(recipe, dtype, batch, steps, warmup, tiny, count_only=False):
    config = recipe_config(recipe, dtype, batch, tiny)
    mesh = train_state.create_mesh()
    net = models.create_model(config.model)
    tx, lr = optim.make_optimizer(config.optim)
    state = train_state.init_train_state(config, net, tx, mesh)
    step_fn = trainer.make_train_step(config, net, tx, lr, mesh)
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (8192, size, size, 3), dtype=np.uint8)
    dataset = data.ImageDataset(images, np.zeros(len(images), np.int32))
    sharding = train_state.batch_sharding(mesh)
    with data.TrainIterator(dataset, batch, sharding, 0, 0, True, prefetch=4) as batches:
        _, batch0 = next(batches)
        lowered = step_fn.lower(state, batch0, None)
        # Count FLOPs on the HLO before device compilation: once convolutions become library
        # calls (cuDNN), the compiled module's cost analysis no longer counts them.
        flops = float(lowered.cost_analysis()["flops"])
        if count_only:
            return {"recipe": recipe, "dtype": dtype, "batch": batch,
                    "tflop_per_step": round(flops / 1e12, 3)}
        start = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = step_fn(state, next(batches)[1], None)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, next(batches)[1], None)
        jax.block_until_ready(state)
        seconds = (time.perf_counter() - start) / steps
    memory = jax.devices()[0].memory_stats() or {}
    return {
        "recipe": recipe, "dtype": dtype, "batch": batch, "params": train_state.count_params(state.params),
        "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 1), "ms_per_step": round(1e3 * seconds, 2),
        "images_per_s": round(batch / seconds, 1), "tflop_per_step": round(flops / 1e12, 3),
        "tflop_per_s": round(flops / seconds / 1e12, 1),
        "peak_gb": round(memory.get("peak_bytes_in_use", 0) / 1e9, 2),
        "loss": float(metrics["loss"]), "jax": jax.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="ict,ct")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU check with the tiny model")
    parser.add_argument("--count-only", action="store_true",
                        help="only count the step's FLOPs (runs anywhere, e.g. on a CPU)")
    parser.add_argument("--out", default="train_throughput.jsonl")
    args = parser.parse_args()
    for dtype in args.dtypes.split(","):
        for recipe in args.recipes.split(","):
            row = measure(recipe, dtype, args.batch, args.steps, args.warmup, args.tiny,
                          args.count_only)
            print(json.dumps(row), flush=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
