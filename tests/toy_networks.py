"""Small stand-ins with the NCSN++ call signature, for tests that need a network but not NCSN++."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyNet(nn.Module):
    """Two convolutions with per-sample GroupNorm and a noise embedding, so a sample's output
    depends on its own input and σ only, as with the real network."""

    @nn.compact
    def __call__(self, x, c_noise, labels=None, *, train):
        emb = nn.Dense(8)(jnp.stack([c_noise, jnp.sin(3.0 * c_noise)], axis=-1))
        h = nn.Conv(8, (3, 3))(x)
        h = nn.swish(nn.GroupNorm(num_groups=2)(h) + emb[:, None, None, :])
        return nn.Conv(x.shape[-1], (3, 3))(h)


def tiny_model(image_shape, seed=0):
    """(TinyNet, its parameters) for images of image_shape (H, W, C)."""
    net = TinyNet()
    x = jnp.zeros((1,) + tuple(image_shape))
    init = jax.jit(lambda k: net.init(k, x, jnp.zeros((1,)), train=False))
    return net, init(jax.random.PRNGKey(seed))["params"]
