"""How far sCM's θ-gradient moves with the compute dtype and the way dF⁻/dt is taken.

    python benchmarks/scm_precision.py workdirs/sct_cpu --images ../shared/data/cifar10/test.npz

On a trained sCT/sCD run's θ and a batch of real images, it computes the loss gradient with
float32 `jax.jvp` (the reference), then with central differences and in bfloat16, and prints
each one's cosine similarity to the reference and its relative distance ‖g − g_ref‖/‖g_ref‖.
The draws (σ, z, dropout) are the same in every variant, and the tangent warm-up is over.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_jax import methods, models, runs, train_state  # noqa: E402
from cm_jax.methods import scm  # noqa: E402

VARIANTS = (
    ("float32", "autodiff", 0.0),
    ("float32", "finite_difference", 0.0),
    ("bfloat16", "autodiff", 0.0),
    ("bfloat16", "finite_difference", 1e-3),
    ("bfloat16", "finite_difference", 0.0),
)


def flat_gradient(run_config, params, batch, dtype, jvp, eps, seed=3):
    """(the θ-gradient as one float64 vector, the difference step used or None)."""
    config = run_config.copy_and_resolve_references()
    config.model.dtype = dtype
    config.scm.update(jvp=jvp, jvp_eps=eps)
    net = models.create_model(config.model)
    loss_fn = methods.get_loss_fn(net, config)
    step = config.scm.tangent_warmup_steps  # r = 1
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, None, batch, jax.random.PRNGKey(seed), step)[0]))
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad(params))])
    used = scm.difference_step(config) if jvp == "finite_difference" else None
    return flat.astype(np.float64), used


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--images", required=True, help="npz with `images` (uint8 NHWC)")
    parser.add_argument("--num_images", type=int, default=64)
    args = parser.parse_args()
    mesh = train_state.create_mesh(jax.devices()[:1])
    config, _, state = runs.restore_run(args.workdir, mesh)
    if methods.of(config) is not methods.get("sct"):
        raise SystemExit(
            f"{args.workdir!r} trained method {config.method!r}: give an sCT run "
            "(sCD's loss also needs its teacher)."
        )
    images = np.load(args.images)["images"][: args.num_images].astype(np.float32) / 127.5 - 1.0
    batch = {"image": jnp.asarray(images), "label": jnp.zeros((len(images),), jnp.int32)}
    params = jax.device_get(state.params)
    reference = None
    for dtype, jvp, eps in VARIANTS:
        g, used = flat_gradient(config, params, batch, dtype, jvp, eps)
        reference = g if reference is None else reference
        cosine = g @ reference / (np.linalg.norm(g) * np.linalg.norm(reference))
        distance = np.linalg.norm(g - reference) / np.linalg.norm(reference)
        step = f"step {used:g}·t" if used else ""
        print(f"{dtype:9s} {jvp:17s} {step:12s} cosine {cosine:.4f}  distance {distance:.4f}")


if __name__ == "__main__":
    main()
