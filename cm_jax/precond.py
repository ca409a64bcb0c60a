"""Preconditioned models: the raw network F_θ wrapped into a denoiser or a consistency function.

The network never sees σ directly: it gets c_in·x and c_noise (karras.py), and its output is
mixed with the input by c_skip and c_out. The EDM denoiser D_θ and the consistency function f_θ
differ only in their scalings, so both go through `_precondition`.
"""
import jax.numpy as jnp

from cm_jax import karras


def _precondition(net, params, x, sigma, scalings, labels, train, dropout_rng):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    s = scalings(sigma)
    rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None
    x_in = karras.per_example(s.c_in, x) * x
    out = net.apply({"params": params}, x_in, s.c_noise, labels, train=train, rngs=rngs)
    return karras.per_example(s.c_skip, x) * x + karras.per_example(s.c_out, x) * out


def edm_denoiser(net, params, x, sigma, labels=None, *, sigma_data=0.5, train=False,
                 dropout_rng=None):
    """D_θ(x; σ) with EDM preconditioning (Karras et al. 2022, Eq. 7 and Table 1)."""
    scalings = lambda s: karras.edm_scalings(s, sigma_data)
    return _precondition(net, params, x, sigma, scalings, labels, train, dropout_rng)


def consistency_fn(net, params, x, sigma, labels=None, *, sigma_data=0.5, sigma_min=0.002,
                   train=False, dropout_rng=None):
    """f_θ(x, σ) = c_skip(σ)·x + c_out(σ)·F_θ(c_in·x, c_noise), with f_θ(x, σ_min) = x (CM §3)."""
    scalings = lambda s: karras.consistency_scalings(s, sigma_data, sigma_min)
    return _precondition(net, params, x, sigma, scalings, labels, train, dropout_rng)
