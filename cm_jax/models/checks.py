"""Input checks shared by the networks: one clear error that names what is wrong with a call."""

import jax.numpy as jnp


def check_network_inputs(name, x, c_noise, labels, num_classes, num_levels):
    """x [B, H, W, C] square, with H divisible by 2^(num_levels − 1) (every level but the last
    halves it); c_noise [B]; labels [B] integers iff num_classes > 0. name prefixes the error."""
    if x.ndim != 4:
        raise ValueError(f"{name}: x must be [B, H, W, C], got shape {x.shape}")
    b, h, w, _ = x.shape
    if h != w:
        raise ValueError(f"{name}: input must be square, got {h}x{w}")
    factor = 2 ** (num_levels - 1)
    if h % factor:
        raise ValueError(
            f"{name}: input resolution {h} is not divisible by {factor} "
            f"(ch_mult has {num_levels} levels)"
        )
    if c_noise.shape != (b,):
        raise ValueError(f"{name}: c_noise must have shape ({b},), got {c_noise.shape}")
    if num_classes > 0:
        if labels is None:
            raise ValueError(f"{name}: num_classes={num_classes} but labels is None")
        if labels.shape != (b,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"{name}: labels must be integer with shape ({b},), got "
                f"{labels.dtype}{labels.shape}"
            )
    elif labels is not None:
        raise ValueError(f"{name}: labels given but num_classes=0 (unconditional model)")
