"""Samplers: one-step consistency sampling and EDM's deterministic Heun sampler.

Pure functions of (network, params, noise); the caller jits them. Images are in [−1, 1].
"""
import jax
import jax.numpy as jnp

from cm_jax import karras, precond


def onestep_sample(net, params, z, labels=None, *, sigma_max=80.0, sigma_min=0.002,
                   sigma_data=0.5):
    """x = f_θ(σ_max·z, σ_max): one network evaluation (CM Algorithm 1 with a single step)."""
    x = precond.consistency_fn(net, params, sigma_max * z, sigma_max, labels,
                               sigma_data=sigma_data, sigma_min=sigma_min)
    return jnp.clip(x, -1.0, 1.0)


def edm_heun_sample(net, params, z, labels=None, *, num_steps=18, sigma_min=0.002,
                    sigma_max=80.0, rho=7.0, sigma_data=0.5):
    """EDM Algorithm 1 (deterministic Heun), 2·num_steps − 1 evaluations (35 for 18 steps).

    The σ grid descends from σ_max to σ_min, then a final Euler step goes to σ = 0.
    """
    sigmas = karras.karras_sigmas(num_steps, sigma_min, sigma_max, rho)[::-1]
    sigmas = jnp.concatenate([sigmas, jnp.zeros((1,))])
    denoise = lambda x, s: precond.edm_denoiser(net, params, x, s, labels, sigma_data=sigma_data)

    def step(x, i):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - denoise(x, s_cur)) / s_cur
        x_euler = x + (s_next - s_cur) * d_cur

        def second_order(x_euler):
            d_next = (x_euler - denoise(x_euler, s_next)) / s_next
            return x + (s_next - s_cur) * 0.5 * (d_cur + d_next)

        # EDM corrects every step but the last one, which lands on σ = 0.
        return jax.lax.cond(s_next > 0, second_order, lambda v: v, x_euler), None

    x, _ = jax.lax.scan(step, z * sigmas[0], jnp.arange(num_steps))
    return jnp.clip(x, -1.0, 1.0)
