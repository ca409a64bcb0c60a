"""u_φ(σ): a learned log-variance of the loss per noise level, the adaptive weighting of sCM
(Lu & Song 2025, §4) in the form of EDM2's uncertainty head (Karras et al. 2024):

    u_φ(σ) = w·√2·cos(2π(ν·c_noise + φ)) + b,  c_noise = ¼·ln σ,

with fixed random frequencies ν ~ N(0, 1) and phases φ ~ U(0, 1) and a learned linear layer
(w, b), zero at the start so that every noise level starts with weight e^0 = 1.

Its parameters live beside the network's in the same tree, under `KEY`, so that the optimizer,
the EMAs and the checkpoints carry them with no special case; `split` separates them again.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

KEY = "uncertainty"


class UncertaintyHead(nn.Module):
    channels: int = 128
    seed: int = 0  # Of the fixed Fourier features; they are constants, not parameters.

    @nn.compact
    def __call__(self, c_noise):
        """[B] c_noise -> [B] u."""
        rng = np.random.default_rng(self.seed)
        freqs = jnp.asarray(rng.standard_normal(self.channels), jnp.float32)
        phases = jnp.asarray(rng.random(self.channels), jnp.float32)
        features = np.sqrt(2.0) * jnp.cos(2.0 * np.pi * (c_noise[:, None] * freqs + phases))
        linear = nn.Dense(1, kernel_init=nn.initializers.zeros, param_dtype=jnp.float32)
        return linear(features)[:, 0]


def init_params(channels, rng):
    return UncertaintyHead(channels).init(rng, jnp.zeros((1,)))["params"]


def log_variance(params, c_noise, channels):
    """u_φ at c_noise ([B]) from the `KEY` entry of a parameter tree."""
    return UncertaintyHead(channels).apply({"params": params[KEY]}, c_noise)


def split(params):
    """(the network's parameters, the head's or None)."""
    if not isinstance(params, dict) or KEY not in params:
        return params, None
    network = {name: value for name, value in params.items() if name != KEY}
    return network, params[KEY]


def attach(network_params, head_params):
    """The network's parameters with the head's beside them."""
    return {**network_params, KEY: head_params}
