"""Sampling throughput: images/s and seconds for 50k CIFAR-10 samples of the paper NCSN++.

    python benchmarks/sample_throughput.py --samplers onestep,twostep,heun \\
        --dtypes bfloat16,float32 --skip float32:twostep --batch 1000 \\
        --samples onestep=50000,twostep=10000,heun=1000

For each compute dtype and sampler it builds the network of configs/common.py `ncsnpp_cifar10`
(56.4M parameters, random weights; or a run's first EMA with --workdir) and samples through
`cm_jax.generate.Generator`, exactly as `launch.py --mode=sample` and `--mode=eval` do: the
noise of each sample from its index, batches sharded over the devices, uint8 images back on the
host after every batch. Samplers:

    onestep  consistency model, CM Algorithm 1 from σ_max = 80      1 network evaluation
    twostep  consistency model, σ = (80, 0.821)                     2
    heun     EDM's Heun sampler, 18 steps (the teacher, EDM Alg. 1) 35

compile_s is the first batch (tracing, compilation, one batch) minus one steady batch. Then
`samples` images are timed; seconds_per_50k is 50,000 over that rate (a direct measurement
where samples is 50,000). tflop_per_s uses XLA's FLOP count of one network forward. One JSON
line per measurement goes to --out. `--tiny` swaps in the CPU test model and a few samples,
to check the script:

    python benchmarks/sample_throughput.py --tiny --dtypes float32 --out /tmp/sample.jsonl
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_throughput import apply_overrides, parse_override  # noqa: E402

from cm_jax import models, precond, runs, train_state  # noqa: E402
from cm_jax.generate import Generator  # noqa: E402
from configs import cifar10_cd_l2, cifar10_edm, common  # noqa: E402

# name -> (config the Generator samples as, network evaluations, Generator.sample options).
# The consistency samplers use the CD config and Heun the EDM teacher's, so that these are the
# very programs `--mode=eval` of such runs compiles (JAX's persistent cache then serves them).
SAMPLERS = {
    "onestep": (cifar10_cd_l2, 1, {}),
    "twostep": (cifar10_cd_l2, 2, {"sigmas": (80.0, 0.821)}),
    "heun": (cifar10_edm, 35, {"edm_steps": 18, "edm_solver": "heun"}),
}
TINY_SAMPLES = {"onestep": 8, "twostep": 8, "heun": 4}


def sampler_config(sampler, dtype, model=None, tiny=False, overrides=()):
    """The sampler's run config with the network `model` (default: the config's own, or the
    tiny CPU one) computing in `dtype`."""
    config = SAMPLERS[sampler][0].get_config()
    if model is not None:
        config.model = model.copy_and_resolve_references()
    elif tiny:
        config.model = common.tiny_ncsnpp()
    config.model.dtype = dtype
    apply_overrides(config, overrides, sampler)
    return config


def load_weights(workdir, mesh, config):
    """(params, their model config, description): a run's first EMA, or random weights."""
    if workdir:
        run_config, _, state = runs.restore_run(workdir, mesh)
        description = f"{workdir} step {int(state.step)}"
        return runs.ema_params(run_config, state), run_config.model, description
    net = models.create_model(config.model)
    init = jax.jit(
        lambda rng: train_state.init_params(config, net, rng),
        out_shardings=train_state.replicated(mesh),
    )
    return init(jax.random.PRNGKey(0)), None, "random"


def forward_flops(net, params, batch, image_size):
    """XLA's FLOP count of one network forward (EDM preconditioning) per image, from the
    lowered program (no compilation); None where the backend gives no count (the GPU backend of
    jax 0.11), and the rows then leave their FLOP fields empty."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    sigma = jax.ShapeDtypeStruct((batch,), jnp.float32)
    lowered = jax.jit(lambda p, x, s: precond.edm_denoiser(net, p, x, s)).lower(params, x, sigma)
    cost = lowered.cost_analysis()
    return float(cost["flops"]) / batch if cost else None


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(gen, sampler, dtype, count, batch, flops_per_forward):
    """One row: compile time, then `count` samples (rounded up to whole batches) timed."""
    _, nfe, options = SAMPLERS[sampler]
    count = -(-count // batch) * batch
    first = timed(lambda: gen.sample(batch, batch_size=batch, **options))
    steady = timed(lambda: gen.sample(batch, batch_size=batch, first_index=batch, **options))
    seconds = timed(lambda: gen.sample(count, batch_size=batch, **options))
    rate = count / seconds
    return {
        "sampler": sampler,
        "dtype": dtype,
        "nfe": nfe,
        "batch": batch,
        "samples": count,
        "compile_s": round(first - steady, 1),
        "seconds": round(seconds, 2),
        "images_per_s": round(rate, 1),
        "seconds_per_50k": round(50_000 / rate, 1),
        "measured_50k": count == 50_000,
        "forwards_per_s": round(rate * nfe, 1),
        **flop_fields(rate * nfe, flops_per_forward),
    }


def flop_fields(forwards_per_s, flops_per_forward):
    """TFLOP/s and GFLOP per forward, empty (None) where XLA gave no count."""
    if flops_per_forward is None:
        return {"tflop_per_s": None, "gflop_per_forward": None}
    return {
        "tflop_per_s": round(forwards_per_s * flops_per_forward / 1e12, 1),
        "gflop_per_forward": round(flops_per_forward / 1e9, 2),
    }


def parse_samples(text, tiny):
    counts = dict(TINY_SAMPLES) if tiny else {"onestep": 50_000, "twostep": 10_000, "heun": 1_000}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        counts[name] = int(value)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default="onestep,twostep,heun")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batch", type=int, default=0, help="default 1000 (--tiny: 4)")
    parser.add_argument(
        "--samples", default="", help="per sampler, e.g. onestep=50000,heun=2000 (others: defaults)"
    )
    parser.add_argument(
        "--skip",
        default="",
        metavar="DTYPE:SAMPLER,...",
        help="pairs not to measure, e.g. float32:twostep",
    )
    parser.add_argument("--workdir", default="", help="sample this run's first EMA")
    parser.add_argument("--tiny", action="store_true", help="CPU check with the tiny model")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=parse_override,
        metavar="[SAMPLER:]KEY=VALUE",
        help="override a config field, e.g. model.attention_impl=cudnn",
    )
    parser.add_argument("--out", default="sample_throughput.jsonl")
    args = parser.parse_args()
    batch = args.batch or (4 if args.tiny else 1000)
    counts = parse_samples(args.samples, args.tiny)
    mesh = train_state.create_mesh()
    samplers = args.samplers.split(",")
    first = sampler_config(samplers[0], "float32", None, args.tiny, args.overrides)
    params, run_model, weights = load_weights(args.workdir, mesh, first)
    # The FLOP count depends on neither the dtype nor the sampler's preconditioning.
    flops = forward_flops(
        models.create_model(first.model if run_model is None else run_model),
        params,
        batch,
        first.data.image_size,
    )
    skipped = set(filter(None, args.skip.split(",")))
    for dtype in args.dtypes.split(","):
        for sampler in samplers:
            if f"{dtype}:{sampler}" in skipped:
                continue
            config = sampler_config(sampler, dtype, run_model, args.tiny, args.overrides)
            net = models.create_model(config.model)
            gen = Generator.from_params(config, net, params, mesh)
            row = measure(gen, sampler, dtype, counts[sampler], batch, flops)
            row.update(
                params=train_state.count_params(params),
                weights=weights,
                device=jax.devices()[0].device_kind,
                devices=jax.device_count(),
                jax=jax.__version__,
            )
            print(json.dumps(row), flush=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
