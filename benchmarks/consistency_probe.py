"""How consistent, and how good a denoiser, a trained run's model is, on real images.

    python benchmarks/consistency_probe.py workdirs/sct_cpu workdirs/ict_cpu \
        --images ../shared/data/cifar10/test.npz

For each run (its first evaluation EMA): the RMS error of f(x + σ·z, σ) against x (D for an
EDM or PD run), and the RMS difference between f at neighbouring σ's for the same z. A
consistency model should give one answer for every σ on a trajectory, so the second figure
falls as it trains; an EDM run's denoiser is the reference for the first. Small runs' samples
are textures, and these figures are what their training can be judged by on a CPU.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_jax import methods, precond, runs, train_state  # noqa: E402


def probe(workdir, images, sigmas, mesh, seed=0):
    config, net, state = runs.restore_run(workdir, mesh)
    params = runs.ema_params(config, state)
    k = config.karras
    if methods.of(config).sampler != "consistency":  # Denoisers: D_θ, EDM's scalings.
        model = lambda p, x, s: precond.edm_denoiser(net, p, x, s, sigma_data=k.sigma_data)
    else:  # Consistency models: f_θ as the samplers use it.
        model = lambda p, x, s: precond.consistency_fn(
            net, p, x, s, sigma_data=k.sigma_data, sigma_min=k.sigma_min
        )
    f = jax.jit(model)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), images.shape))
    out = {s: np.asarray(f(params, images + s * z, jnp.float32(s))) for s in sigmas}
    rms = lambda a: float(np.sqrt(np.mean(a**2)))
    return {
        "workdir": workdir,
        "method": config.method,
        "step": int(state.step),
        "error": {s: round(rms(out[s] - images), 3) for s in sigmas},
        "consistency": {
            f"{b} vs {a}": round(rms(out[b] - out[a]), 3) for a, b in zip(sigmas, sigmas[1:])
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--images", required=True, help="npz with `images` (uint8 NHWC)")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--sigmas", default="0.1,0.5,1,2,5")
    args = parser.parse_args()
    images = np.load(args.images)["images"][: args.num_images].astype(np.float32) / 127.5 - 1.0
    sigmas = [float(s) for s in args.sigmas.split(",")]
    mesh = train_state.create_mesh(jax.devices()[:1])
    for workdir in args.workdirs:
        print(probe(workdir, images, sigmas, mesh))


if __name__ == "__main__":
    main()
