"""The EDM / Karras noise geometry: the σ grid and the preconditioning scalings.

Conventions (Karras et al. 2022, "EDM"; Song et al. 2023, "Consistency Models", CM):
- σ = t is the noise level of the variance-exploding PF-ODE, x_σ = x + σ·z.
- The grid is **ascending**, index i = 0..N−1 with σ_0 = σ_min (the paper's ε) and
  σ_{N−1} = σ_max (the paper's T), which is the CM paper's t_1 < … < t_N shifted to 0-based.
  (The official JAX code stores the same grid descending; the values are identical.)

Everything here is a pure function of arrays; N may be a traced integer, so a curriculum that
changes N never forces a recompilation.
"""

from typing import NamedTuple

import jax.numpy as jnp


def karras_sigma(i, num_scales, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """σ_i of the N-point Karras grid, ascending (EDM Eq. 5 reversed; the CM paper's t_i).

    σ_i = (σ_min^{1/ρ} + i/(N−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ,  i = 0..N−1.
    """
    i = jnp.asarray(i, jnp.float32)
    frac = i / (jnp.asarray(num_scales, jnp.float32) - 1.0)
    inv_rho = 1.0 / rho
    lo, hi = sigma_min**inv_rho, sigma_max**inv_rho
    return (lo + frac * (hi - lo)) ** rho


def grid(karras_config):
    """The grid's keyword arguments (sigma_min, sigma_max, rho) from `config.karras`."""
    return dict(
        sigma_min=karras_config.sigma_min, sigma_max=karras_config.sigma_max, rho=karras_config.rho
    )


def karras_sigmas(num_scales, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The whole ascending grid σ_0 < … < σ_{N−1} for a static N."""
    return karras_sigma(jnp.arange(num_scales), num_scales, sigma_min, sigma_max, rho)


def per_example(v, x):
    """A per-example [B] quantity (σ, a weight) shaped to broadcast against images [B, H, W, C]."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


class Scalings(NamedTuple):
    """The four preconditioning factors: D = c_skip·x + c_out·F(c_in·x, c_noise)."""

    c_skip: jnp.ndarray
    c_out: jnp.ndarray
    c_in: jnp.ndarray
    c_noise: jnp.ndarray


def noise_conditioning(sigma):
    """c_noise = ¼·ln σ (EDM Table 1), the network's noise input in the official CM code."""
    return 0.25 * jnp.log(sigma)


# The network's noise input c_noise, chosen per network (`NCSNpp.noise_conditioning`, read by
# precond.py): "log_sigma" is EDM's ¼·ln σ; "trigflow_t" is TrigFlow's t = arctan(σ/σ_d), sCM's
# identity time transformation c_noise(t) = t (Lu & Song 2025, §4.1: "we propose to use
# c_noise(t) = t as the default time transformation"), whose derivative in t is 1 where
# ¼·ln(σ_d·tan t) has sin(t)·∂_t c_noise = 1/(4·cos t), unbounded as t → π/2.
NOISE_CONDITIONINGS = ("log_sigma", "trigflow_t")


def check_noise_conditioning(conditioning):
    """`conditioning` itself, or a ValueError naming the allowed values."""
    if conditioning not in NOISE_CONDITIONINGS:
        raise ValueError(f"noise_conditioning={conditioning!r} is not one of {NOISE_CONDITIONINGS}")
    return conditioning


def noise_input(sigma, conditioning="log_sigma", sigma_data=0.5):
    """c_noise of the noise level σ: ¼·ln σ ("log_sigma") or arctan(σ/σ_d) ("trigflow_t")."""
    if check_noise_conditioning(conditioning) == "trigflow_t":
        return jnp.arctan2(sigma, sigma_data)
    return noise_conditioning(sigma)


def noise_input_from_time(t, conditioning="log_sigma", sigma_data=0.5):
    """c_noise of TrigFlow's time t (σ = σ_d·tan t): t itself ("trigflow_t"), so a JVP in t
    passes through it exactly, or ¼·ln(σ_d·tan t) ("log_sigma")."""
    if check_noise_conditioning(conditioning) == "trigflow_t":
        return t
    return noise_conditioning(sigma_data * jnp.tan(t))


def edm_scalings(sigma, sigma_data=0.5, conditioning="log_sigma"):
    """EDM preconditioning (Karras et al. 2022, Table 1), used by the diffusion teacher.

    c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²); c_noise by
    `conditioning` (`noise_input`).
    """
    s2, d2 = sigma**2, sigma_data**2
    return Scalings(
        c_skip=d2 / (s2 + d2),
        c_out=sigma * sigma_data / jnp.sqrt(s2 + d2),
        c_in=1.0 / jnp.sqrt(s2 + d2),
        c_noise=noise_input(sigma, conditioning, sigma_data),
    )


def consistency_scalings(sigma, sigma_data=0.5, sigma_min=0.002, conditioning="log_sigma"):
    """The boundary-condition parameterisation of a consistency model (CM paper, Appendix C).

    c_skip = σ_d²/((σ−σ_min)²+σ_d²) and c_out = (σ−σ_min)·σ_d/√(σ²+σ_d²), so at σ = σ_min
    c_skip = 1 and c_out = 0: f(x, σ_min) = x exactly (the boundary condition of CM §3; this
    is what makes it hold to float precision). Note the c_out denominator uses σ², not
    (σ−σ_min)², as the official code does.
    c_in and c_noise are EDM's (c_noise by `conditioning`, as in `edm_scalings`).
    """
    d2 = sigma_data**2
    shifted = sigma - sigma_min
    return Scalings(
        c_skip=d2 / (shifted**2 + d2),
        c_out=shifted * sigma_data / jnp.sqrt(sigma**2 + d2),
        c_in=1.0 / jnp.sqrt(sigma**2 + d2),
        c_noise=noise_input(sigma, conditioning, sigma_data),
    )
