"""Distance metrics d(x, y) between the online and target outputs, one value per example.

Every metric takes two [B, H, W, C] arrays and returns [B]. The consistency losses look them up
by name (`get_distance`), so a new weight-free metric is one more entry in `DISTANCES`. LPIPS,
which needs network weights, lives in lpips.py and is wired by `methods.base.metric`.
"""

import math

import jax.numpy as jnp


def _flat(diff):
    return diff.reshape(diff.shape[0], -1)


def l2(x, y):
    """Mean squared error per example (the official code's `l2`: ‖x − y‖²/d)."""
    return jnp.mean(_flat(x - y) ** 2, axis=1)


def l1(x, y):
    """Mean absolute error per example (the official code's `l1`: ‖x − y‖₁/d)."""
    return jnp.mean(jnp.abs(_flat(x - y)), axis=1)


def pseudo_huber_c(dim):
    """iCT's default c = 0.00054·√d: 0.0299 for 3×32×32, 0.0599 for 3×64×64."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(x, y, c=None):
    """Pseudo-Huber metric over the WHOLE image (iCT): d = √(‖x − y‖₂² + c²) − c.

    The norm is taken over all d = H·W·C values of an example, as in the iCT paper and ECT;
    several public re-implementations apply it per pixel and average, which is another loss.
    c defaults to 0.00054·√d.
    """
    diff = _flat(x - y)
    if c is None:
        c = pseudo_huber_c(diff.shape[1])
    return jnp.sqrt(jnp.sum(diff**2, axis=1) + c**2) - c


DISTANCES = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber}


def get_distance(name, huber_c=None):
    """The metric called `name`; huber_c (None or < 0: iCT's default) applies to pseudo_huber."""
    if name == "pseudo_huber":
        c = None if huber_c is None or huber_c < 0 else float(huber_c)
        return lambda x, y: pseudo_huber(x, y, c)
    if name not in DISTANCES:
        raise ValueError(f"Unknown distance {name!r}: use one of {sorted(DISTANCES)}.")
    return DISTANCES[name]
