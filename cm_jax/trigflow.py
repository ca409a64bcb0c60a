"""TrigFlow (Lu & Song 2025, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", §3-4): the coordinates of sCM, and the tangent its continuous-time loss regresses on.

    x_t = cos(t)·x_0 + sin(t)·z,  z ~ N(0, σ_d²I),  t ∈ [0, π/2]
    f_θ(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F_θ(x_t/σ_d, t)

They are EDM's in other units: σ = σ_d·tan(t) and x_t = cos(t)·x_σ, so x_σ = x_0 + σ·z/σ_d,
and f_θ is EDM's denoiser D_θ(x_σ; σ) (precond.trigflow_velocity). Every function is
elementwise in a per-example t of shape [B].
"""

import jax.numpy as jnp

from cm_jax import karras


def time_from_sigma(sigma, sigma_data=0.5):
    """t = arctan(σ/σ_d)."""
    return jnp.arctan2(sigma, sigma_data)


def sigma_from_time(t, sigma_data=0.5):
    """σ = σ_d·tan(t)."""
    return sigma_data * jnp.tan(t)


def _cos_sin(t, x):
    return karras.per_example(jnp.cos(t), x), karras.per_example(jnp.sin(t), x)


def noisy(x0, z, t):
    """x_t = cos(t)·x_0 + sin(t)·z."""
    cos, sin = _cos_sin(t, x0)
    return cos * x0 + sin * z


def training_velocity(x0, z, t):
    """dx_t/dt = cos(t)·z − sin(t)·x_0 along the one trajectory through x_0 and z: sCT's
    stand-in for the PF-ODE velocity, as CT's Euler step uses the clean image."""
    cos, sin = _cos_sin(t, x0)
    return cos * z - sin * x0


def tangent(F_minus, dF_minus, x_t, velocity, t, warmup, sigma_data=0.5):
    """g, the regression offset of the sCM loss (its Algorithm 1):

      g = −cos²(t)·(σ_d·F_θ⁻ − dx_t/dt) − r·cos(t)·sin(t)·(x_t + σ_d·dF_θ⁻/dt),

    r the tangent warm-up. dF_minus is the JVP of F_θ⁻ along (cos·sin·dx_t/dt, cos·sin),
    so it already carries cos(t)·sin(t)·dF_θ⁻/dt: the factor that keeps the time derivative of
    c_noise = ¼·ln(σ_d·tan t) bounded (1/4) at both ends of [0, π/2].
    """
    cos, sin = _cos_sin(t, x_t)
    return -(cos**2) * (sigma_data * F_minus - velocity) - warmup * (
        cos * sin * x_t + sigma_data * dF_minus
    )


def normalize_tangent(g, c=0.1, norm="rms"):
    """g/(‖g‖ + c) per example (tangent normalisation). norm="l2" is the paper's
    Euclidean norm; "rms" divides it by √dim (NVlabs/FastGen's default), so that c means the
    same at every resolution."""
    flat = g.reshape(g.shape[0], -1)
    size = jnp.sqrt(jnp.sum(flat**2, axis=1))
    if norm == "rms":
        size = size / jnp.sqrt(flat.shape[1])
    elif norm != "l2":
        raise ValueError(f"Unknown tangent norm {norm!r}: use rms or l2.")
    return g / karras.per_example(size + c, g)


def central_difference(fn, x, t, dx_dt, eps=1e-3):
    """d/dε fn(x + ε·dx/dt, t + ε) at ε = 0 by central differences, with a step h = eps·t per
    example (kept below π/2 − t): the derivative of a network along the trajectory, for
    networks that forward-mode autodiff cannot go through (a custom VJP such as cuDNN's fused
    attention). O(h²) error plus float32 round-off of about 1e-7/h."""
    h = jnp.minimum(eps * t, 0.5 * (jnp.pi / 2 - t))
    step = karras.per_example(h, x) * dx_dt
    return (fn(x + step, t + h) - fn(x - step, t - h)) / karras.per_example(2.0 * h, x)


def tangent_warmup(step, warmup_steps):
    """r = min(1, k/warmup_steps): the tangent's second term fades in over the first steps."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
