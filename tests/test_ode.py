"""One PF-ODE step against hand-worked values on data whose ODE has a closed form.

For Gaussian data N(0, s²I) the ideal denoiser is D(x; σ) = s²/(s² + σ²)·x and the PF-ODE
solution is x(σ) = x(σ₀)·√((s² + σ²)/(s² + σ₀²)).
"""

import jax.numpy as jnp
import pytest

from cm_jax import karras, ode

S2 = 0.25  # s = 0.5


def gaussian_denoiser(x, sigma):
    sigma = jnp.asarray(sigma)
    sigma = karras.per_example(sigma, x) if sigma.ndim else sigma
    return S2 / (S2 + sigma**2) * x


def test_euler_and_heun_steps_by_hand():
    # From σ = 1 to 0.5 at x = 1: slope (1 − 0.25/1.25)/1 = 0.8, Euler x = 1 − 0.5·0.8 = 0.6;
    # slope at (0.6, 0.5): (0.6 − 0.5·0.6)/0.5 = 0.6, Heun x = 1 − 0.5·(0.8 + 0.6)/2 = 0.65.
    # Exact: √(0.5/1.25) = 0.632456. Heun is closer.
    x = jnp.ones((1, 1, 1, 1))
    euler = float(ode.euler_step(gaussian_denoiser, x, 1.0, 0.5)[0, 0, 0, 0])
    heun = float(ode.heun_step(gaussian_denoiser, x, 1.0, 0.5)[0, 0, 0, 0])
    assert euler == pytest.approx(0.6, rel=1e-6)
    assert heun == pytest.approx(0.65, rel=1e-6)
    assert abs(heun - 0.632456) < abs(euler - 0.632456)


def test_per_example_sigmas():
    x = jnp.ones((2, 1, 1, 1))
    out = ode.heun_step(gaussian_denoiser, x, jnp.array([1.0, 2.0]), jnp.array([0.5, 1.0]))
    assert float(out[0, 0, 0, 0]) == pytest.approx(0.65, rel=1e-6)
    # σ: 2 → 1: slope (1 − 0.25/4.25)/2 = 0.470588; Euler 0.529412; slope there
    # (0.529412 − 0.2·0.529412)/1 = 0.423529; Heun 1 − (0.470588 + 0.423529)/2 = 0.552941.
    assert float(out[1, 0, 0, 0]) == pytest.approx(0.552941, rel=1e-5)


def test_point_mass_steps_are_exact():
    # D = x0: the trajectory x0 + σ·z is a straight line, so both solvers are exact.
    x0 = jnp.full((1, 2, 2, 1), 0.3)
    z = jnp.full((1, 2, 2, 1), -1.2)
    denoise = lambda x, s: x0
    for step in ode.SOLVERS.values():
        out = step(denoise, x0 + 5.0 * z, 5.0, 0.7)
        assert jnp.allclose(out, x0 + 0.7 * z, atol=1e-6)
