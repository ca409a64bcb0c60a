"""Distance metrics against hand-worked values."""

import jax.numpy as jnp
import pytest

from cm_jax import distances


def _pair():
    x = jnp.zeros((2, 32, 32, 3))
    return x, x + 0.01


def test_l2_l1_are_per_pixel_means():
    x, y = _pair()
    assert distances.l2(x, y).tolist() == pytest.approx([1e-4, 1e-4], rel=1e-5)
    assert distances.l1(x, y).tolist() == pytest.approx([0.01, 0.01], rel=1e-5)


def test_pseudo_huber_is_over_the_whole_image():
    # d = 3072, c = 0.00054·√3072 = 0.0299298; ‖x − y‖² = 3072·1e-4 = 0.3072;
    # √(0.3072 + 0.0299298²) − 0.0299298 = √0.30809579 − 0.0299298 = 0.5251338.
    assert distances.pseudo_huber_c(3072) == pytest.approx(0.0299298, rel=1e-5)
    x, y = _pair()
    assert distances.pseudo_huber(x, y).tolist() == pytest.approx([0.5251338] * 2, rel=1e-5)
    # The per-pixel version some re-implementations use would give 0.0016, not this.


def test_pseudo_huber_custom_c_and_zero():
    x, y = _pair()
    d = distances.get_distance("pseudo_huber", huber_c=0.0)
    assert float(d(x, y)[0]) == pytest.approx(0.3072**0.5, rel=1e-5)
    assert float(distances.pseudo_huber(x, x)[0]) == 0.0


def test_unknown_distance_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown distance 'l3'"):
        distances.get_distance("l3")
