"""Preconditioned models: the raw network F_θ wrapped into a denoiser or a consistency function.

The network never sees σ directly: it gets c_in·x and c_noise (karras.py), and its output is
mixed with the input by c_skip and c_out. The EDM denoiser D_θ and the consistency function f_θ
differ only in their scalings, so both go through `_precondition`; sCM's TrigFlow velocity is
the same network read in other coordinates (`trigflow_velocity`).

Which c_noise a network is trained on travels with the network: its `noise_conditioning`
field ("log_sigma", EDM's ¼·ln σ, when it has none, as ADM; or "trigflow_t", sCM's
c_noise = t = arctan(σ/σ_d)), read here by every path, so samplers, editing and every method
feed it the same input.
"""

import jax.numpy as jnp

from cm_jax import karras, trigflow
from cm_jax.models import uncertainty


def _apply(net, params, x_in, c_noise, labels, train, dropout_rng):
    """The raw network F_θ(c_in·x, c_noise); an uncertainty head beside θ (sCM) is not its."""
    network_params, _ = uncertainty.split(params)
    rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None
    return net.apply({"params": network_params}, x_in, c_noise, labels, train=train, rngs=rngs)


def noise_conditioning(net):
    """The c_noise convention of `net`: its `noise_conditioning` field, or "log_sigma"."""
    return karras.check_noise_conditioning(getattr(net, "noise_conditioning", "log_sigma"))


def _precondition(net, params, x, sigma, scalings, labels, train, dropout_rng):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    s = scalings(sigma)
    x_in = karras.per_example(s.c_in, x) * x
    out = _apply(net, params, x_in, s.c_noise, labels, train, dropout_rng)
    return karras.per_example(s.c_skip, x) * x + karras.per_example(s.c_out, x) * out


def edm_denoiser(
    net, params, x, sigma, labels=None, *, sigma_data=0.5, train=False, dropout_rng=None
):
    """D_θ(x; σ) with EDM preconditioning (Karras et al. 2022, Eq. 7 and Table 1)."""
    conditioning = noise_conditioning(net)
    scalings = lambda s: karras.edm_scalings(s, sigma_data, conditioning)
    return _precondition(net, params, x, sigma, scalings, labels, train, dropout_rng)


def consistency_fn(
    net,
    params,
    x,
    sigma,
    labels=None,
    *,
    sigma_data=0.5,
    sigma_min=0.002,
    train=False,
    dropout_rng=None,
):
    """f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in·x, c_noise), with f_θ(x, σ_min) = x (CM §3)."""
    conditioning = noise_conditioning(net)
    scalings = lambda s: karras.consistency_scalings(s, sigma_data, sigma_min, conditioning)
    return _precondition(net, params, x, sigma, scalings, labels, train, dropout_rng)


def trigflow_velocity(
    net, params, x_t, t, labels=None, *, sigma_data=0.5, train=False, dropout_rng=None
):
    """sCM's F_θ(x_t/σ_d, t) (Lu & Song 2025, TrigFlow) of an EDM-preconditioned network.

    TrigFlow's x_t = cos(t)·x_0 + sin(t)·z, z ~ N(0, σ_d²I), is EDM's x_σ = x_0 + σ·n scaled by
    cos(t), with σ = σ_d·tan(t) (trigflow.py). EDM's c_skip = cos²(t), c_out = σ_d·sin(t) and
    c_in·x_σ = x_t/σ_d turn D_θ(x_σ; σ) = cos(t)·x_t − σ_d·sin(t)·F_θ into the identity
    F_θ = −F_net(x_t/σ_d, c_noise(σ)): the velocity is the raw output, negated, with no
    cancellation at small t. t is [B] and differentiable (sCM's tangent takes a JVP in t).
    c_noise is ¼·ln(σ_d·tan t), or t itself for a network with noise_conditioning="trigflow_t"
    (sCM's c_noise(t) = t), so the JVP in t reaches the network's time input with factor 1.
    """
    if noise_conditioning(net) == "trigflow_t":
        c_noise = karras.noise_input_from_time(t, "trigflow_t", sigma_data)
    else:
        c_noise = karras.noise_conditioning(trigflow.sigma_from_time(t, sigma_data))
    out = _apply(net, params, x_t / sigma_data, c_noise, labels, train, dropout_rng)
    return -out
