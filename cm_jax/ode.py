"""One step of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (EDM Eqs. 1 and 3, σ(t) = t),
from σ_from to σ_to, for any denoiser D. Consistency distillation takes one such step with the
teacher (CM Algorithm 2, the solver Φ); the EDM samplers chain them.
"""

import jax.numpy as jnp

from cm_jax import karras


def _bcast(sigma, x):
    """A scalar σ as is; a per-example [B] σ shaped against the images."""
    sigma = jnp.asarray(sigma)
    return sigma if sigma.ndim == 0 else karras.per_example(sigma, x)


def _slope(denoise, x, sigma):
    """dx/dσ = (x − D(x; σ))/σ."""
    return (x - denoise(x, sigma)) / _bcast(sigma, x)


def euler_step(denoise, x, sigma_from, sigma_to):
    """x + (σ_to − σ_from)·dx/dσ at σ_from (first order)."""
    return x + _bcast(sigma_to - sigma_from, x) * _slope(denoise, x, sigma_from)


def heun_step(denoise, x, sigma_from, sigma_to):
    """Heun's second-order step (EDM Algorithm 1, lines 5-8): the mean of the slopes at both
    ends, the second taken at the Euler prediction. σ_to must be > 0."""
    d_from = _slope(denoise, x, sigma_from)
    step = _bcast(sigma_to - sigma_from, x)
    x_euler = x + step * d_from
    d_to = _slope(denoise, x_euler, sigma_to)
    return x + step * 0.5 * (d_from + d_to)


SOLVERS = {"heun": heun_step, "euler": euler_step}
