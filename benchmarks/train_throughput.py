"""Training throughput: images/s of the real train step (loss, gradient, optimizer, EMAs).

    python benchmarks/train_throughput.py --recipes ict,ct --dtypes bfloat16,float32 --batch 512
    python benchmarks/train_throughput.py --recipes edm,cd,pd --dtypes bfloat16 --batch 512

For each recipe and compute dtype it builds the paper config's model and the jitted, sharded
train step exactly as `launch.py` does, feeds it through the real input pipeline (a synthetic
in-memory dataset of random images, so no data files are needed), and reports compile time,
milliseconds per step, images/s, the FLOPs per step (XLA's count on the HLO) and the achieved
TFLOP/s. One JSON line per measurement goes to --out. `--tiny` swaps in the CPU test model, to
check the script; `--count-only` only counts FLOPs, on shapes alone (runs on a CPU, allocating
no state).

Recipes: ct (l2), ict, edm (the diffusion teacher), cd (configs/cifar10_cd_l2.py: a Heun step
of a frozen EDM teacher per example), pd (configs/cifar10_pd.py: two Euler half-steps of the
teacher θ⁻ held in the state), ect (configs/cifar10_ect.py: a student and a stop-gradient
target pass), sct and scd (configs/cifar10_{sct,scd}.py: sCM's online pass and a JVP of the
stop-gradient network, plus the teacher's velocity for scd), and the ImageNet-64 runs on ADM
at 64×64: edm64, cd64 and ct64 (both with l2), and LSUN-256 CD on its 526M ADM: cd256
(with l2).
The teachers are randomly initialised networks of the student's architecture, passed to the
step exactly as `trainer.train_and_evaluate` passes a trained one (`frozen={"teacher": params}`
and `teacher_net` for cd and scd; θ⁻ for pd; the starting θ for ect), so the step's
cost is that of a real run.

`--set [recipe:]key=value` overrides a config field (value parsed as a Python literal, else a
string), for one recipe or all, e.g. `--set edm:optim.warmup_steps=100` or
`--set model.attention_impl=cudnn`. benchmarks/device_checks.sh uses it to make these steps the
very programs its short real runs compile, so JAX's persistent compilation cache serves them
there; the overrides it uses change constants, not the step's cost.
"""

import argparse
import ast
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_jax import data, input_pipeline, methods, models, optim, train_state, trainer  # noqa: E402
from cm_jax.models import uncertainty  # noqa: E402
from configs import (
    cifar10_cd_l2,
    cifar10_ct,
    cifar10_ect,
    cifar10_edm,
    cifar10_ict,  # noqa: E402
    cifar10_pd,
    cifar10_scd,
    cifar10_sct,
    common,
    imagenet64_cd,
    imagenet64_ct,
    imagenet64_edm,
    lsun256_cd,
)

RECIPES = {
    "ct": cifar10_ct,
    "ict": cifar10_ict,
    "edm": cifar10_edm,
    "cd": cifar10_cd_l2,
    "pd": cifar10_pd,
    "ect": cifar10_ect,
    "sct": cifar10_sct,
    "scd": cifar10_scd,
    "edm64": imagenet64_edm,
    "cd64": imagenet64_cd,
    "ct64": imagenet64_ct,
    "cd256": lsun256_cd,
}
LPIPS_RECIPES = ("ct", "cd64", "ct64", "cd256")  # timed with l2: LPIPS needs the VGG16 file
TEACHER_SEED = 1  # the random teacher's initialiser key (the student's own init uses train.seed)


def parse_override(text):
    """'[recipe:]a.b=value' -> (recipe or None, 'a.b', value as a Python literal or a string)."""
    scope, _, assignment = text.rpartition(":") if ":" in text.split("=")[0] else ("", "", text)
    key, equals, raw = assignment.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"--set wants [recipe:]key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return scope or None, key, value


def apply_overrides(config, overrides, recipe):
    for scope, key, value in overrides:
        if scope not in (None, recipe):
            continue
        *path, leaf = key.split(".")
        node = config
        for name in path:
            node = node[name]
        node[leaf] = value


def recipe_config(recipe, dtype, batch, tiny, overrides=()):
    config = RECIPES[recipe].get_config()
    if recipe in LPIPS_RECIPES:
        config.loss.distance = "l2"  # The paper's metric is LPIPS; l2 is the paper's *-l2.
    if tiny and config.model.name == "adm":
        config.model = common.tiny_adm()
        config.model.attn_resolutions = (config.data.image_size // 2,)  # its second level
    elif tiny:
        config.model = common.tiny_ncsnpp()
    config.model.dtype = dtype
    config.train.batch_size = batch
    apply_overrides(config, overrides, recipe)
    return config


def random_teacher(config, net, mesh):
    """(teacher_net, frozen, the student's initial params) as `trainer.train_and_evaluate`
    builds them from `load_frozen_networks` and `initial_student`, with a randomly initialised
    network of the student's architecture as the teacher of cd, pd, ect, sct and scd. PD moves
    it out of `frozen` into the state's θ⁻, ECT and sCT only start from it; CD and sCD keep it
    frozen and start the student from it (teacher.init_student)."""
    if not methods.of(config).uses_teacher(config):  # no teacher; LPIPS where configured
        teacher_net, frozen = trainer.load_frozen_networks(config, mesh)
        return teacher_net, frozen, None
    # An EDM run's parameters: the network's alone (sCM's uncertainty head is the student's).
    init = jax.jit(
        lambda rng: uncertainty.split(train_state.init_params(config, net, rng))[0],
        out_shardings=train_state.replicated(mesh),
    )
    frozen = {"teacher": init(jax.random.PRNGKey(TEACHER_SEED))}
    return net, frozen, trainer.initial_student(config, net, frozen)


def count_flops(config, net, tx, lr, mesh):
    """XLA's FLOP count of the train step, lowered on shapes alone: no state, teacher or batch
    is allocated, so a 526M-parameter LSUN step is counted on a small machine. The frozen
    teacher is there where the loss reads it (CD, sCD); PD's is θ⁻, in the state."""
    method = methods.of(config)
    teacher_net, frozen = None, {}
    if method.uses_teacher(config):
        teacher_net = net
        if method.distills:
            key = jax.random.PRNGKey(TEACHER_SEED)
            shapes = jax.eval_shape(lambda: train_state.init_params(config, net, key))
            frozen["teacher"] = uncertainty.split(shapes)[0]
    step_fn = trainer.make_train_step(config, net, tx, lr, mesh, teacher_net)
    state = train_state.abstract_train_state(config, net, tx, mesh)
    size, rows = config.data.image_size, config.train.batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((rows, size, size, 3), np.float32),
        "label": jax.ShapeDtypeStruct((rows,), np.int32),
    }
    cost = step_fn.lower(state, batch, frozen).cost_analysis()
    if not cost:
        raise SystemExit(
            f"{jax.default_backend()}: XLA gives no FLOP count here; "
            "run --count-only with JAX_PLATFORMS=cpu"
        )
    return float(cost["flops"])


def measure(recipe, dtype, batch, steps, warmup, tiny, count_only=False, overrides=()):
    config = recipe_config(recipe, dtype, batch, tiny, overrides)
    mesh = train_state.create_mesh()
    net = models.create_model(config.model)
    tx, lr = optim.make_optimizer(config.optim)
    if count_only:
        return {
            "recipe": recipe,
            "dtype": dtype,
            "batch": batch,
            "tflop_per_step": round(count_flops(config, net, tx, lr, mesh) / 1e12, 3),
            **override_fields(overrides, recipe),
        }
    teacher_net, frozen, initial = random_teacher(config, net, mesh)
    state = train_state.init_train_state(config, net, tx, mesh, initial_params=initial)
    step_fn = trainer.make_train_step(config, net, tx, lr, mesh, teacher_net)
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (8192, size, size, 3), dtype=np.uint8)
    dataset = data.ImageDataset(images, np.zeros(len(images), np.int32))
    sharding = train_state.batch_sharding(mesh)
    with input_pipeline.TrainIterator(dataset, batch, sharding, 0, 0, True, prefetch=4) as batches:
        _, batch0 = next(batches)
        lowered = step_fn.lower(state, batch0, frozen)
        # Count FLOPs on the HLO before device compilation: once convolutions become library
        # calls (cuDNN), the compiled module's cost analysis no longer counts them. The GPU
        # backend of jax 0.11 gives no count for a lowered program (None): there the rows leave
        # the FLOP fields empty, and `--count-only` on a CPU supplies them.
        cost = lowered.cost_analysis()
        flops = float(cost["flops"]) if cost else None
        start = time.perf_counter()
        lowered.compile()
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = step_fn(state, next(batches)[1], frozen)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, next(batches)[1], frozen)
        jax.block_until_ready(state)
        seconds = (time.perf_counter() - start) / steps
    memory = jax.devices()[0].memory_stats() or {}
    return {
        "recipe": recipe,
        "dtype": dtype,
        "batch": batch,
        "params": train_state.count_params(state.params),
        "devices": jax.device_count(),
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 1),
        "ms_per_step": round(1e3 * seconds, 2),
        "images_per_s": round(batch / seconds, 1),
        "tflop_per_step": round(flops / 1e12, 3) if flops else None,
        "tflop_per_s": round(flops / seconds / 1e12, 1) if flops else None,
        "peak_gb": round(memory.get("peak_bytes_in_use", 0) / 1e9, 2),
        "loss": float(metrics["loss"]),
        "jax": jax.__version__,
        **override_fields(overrides, recipe),
    }


def override_fields(overrides, recipe):
    """The overrides that applied to this recipe, for the JSON row (none: no field)."""
    applied = {key: value for scope, key, value in overrides if scope in (None, recipe)}
    return {"overrides": applied} if applied else {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="ict,ct")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="CPU check with the tiny model")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="only count the step's FLOPs (runs anywhere, e.g. on a CPU)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=parse_override,
        metavar="[RECIPE:]KEY=VALUE",
        help="override a config field (for one recipe, or all); repeatable",
    )
    parser.add_argument("--out", default="train_throughput.jsonl")
    args = parser.parse_args()
    for dtype in args.dtypes.split(","):
        for recipe in args.recipes.split(","):
            row = measure(
                recipe,
                dtype,
                args.batch,
                args.steps,
                args.warmup,
                args.tiny,
                args.count_only,
                args.overrides,
            )
            print(json.dumps(row), flush=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
