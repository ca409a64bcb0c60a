"""The σ grid and the preconditioning scalings against values worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import karras, precond


def test_grid_endpoints_and_midpoint():
    # N = 3: σ_1 = ((0.002^{1/7} + 80^{1/7})/2)^7 = ((0.4115597 + 1.8701223)/2)^7 = 1.1408410^7.
    sigmas = np.asarray(karras.karras_sigmas(3))
    np.testing.assert_allclose(sigmas, [0.002, 2.515219, 80.0], rtol=2e-6)


def test_grid_is_ascending_and_traced_n_matches_static():
    static = karras.karras_sigmas(18)
    assert np.all(np.diff(np.asarray(static)) > 0)
    traced = jax.jit(lambda n: karras.karras_sigma(jnp.arange(18), n))(jnp.int32(18))
    np.testing.assert_allclose(traced, static, rtol=1e-6)


def test_edm_scalings_at_sigma_data():
    # σ = σ_d = 0.5: c_skip = 0.25/0.5, c_out = 0.25/√0.5, c_in = 1/√0.5, c_noise = ln(0.5)/4.
    s = karras.edm_scalings(jnp.float32(0.5), 0.5)
    np.testing.assert_allclose(
        [s.c_skip, s.c_out, s.c_in, s.c_noise], [0.5, 0.3535534, 1.4142136, -0.1732868], rtol=1e-6
    )


def test_noise_input_by_hand():
    # "log_sigma": ¼·ln σ; σ = 0.5 → ln(0.5)/4 = −0.1732868. "trigflow_t": t = arctan(σ/σ_d):
    # σ = σ_d → π/4, σ = σ_d·√3 → π/3, σ = σ_d/√3 → π/6, σ = 0 → 0.
    sigma = jnp.array([0.5, 0.5 * 3**0.5, 0.5 / 3**0.5, 0.0])
    np.testing.assert_allclose(
        karras.noise_input(sigma, "trigflow_t", 0.5),
        [np.pi / 4, np.pi / 3, np.pi / 6, 0.0],
        rtol=1e-6,
    )
    np.testing.assert_allclose(karras.noise_input(sigma[0]), -0.1732868, rtol=1e-6)
    np.testing.assert_allclose(karras.noise_input(jnp.float32(2.0), "trigflow_t", 2.0), np.pi / 4)
    # From TrigFlow's t: t itself, or ¼·ln(σ_d·tan t); t = π/4 → ¼·ln 0.5.
    t = jnp.array([np.pi / 4, 1.1])
    np.testing.assert_array_equal(karras.noise_input_from_time(t, "trigflow_t"), t)
    np.testing.assert_allclose(karras.noise_input_from_time(t[0]), -0.1732868, rtol=1e-6)
    # Round trip: σ = σ_d·tan(t) back to t.
    np.testing.assert_allclose(karras.noise_input(0.5 * jnp.tan(t), "trigflow_t"), t, rtol=1e-6)
    with pytest.raises(ValueError, match="noise_conditioning='bogus'"):
        karras.noise_input(sigma, "bogus")


def test_scalings_carry_the_noise_conditioning():
    # σ = σ_d: c_noise = π/4 under "trigflow_t"; c_skip, c_out, c_in do not depend on it.
    edm = karras.edm_scalings(jnp.float32(0.5), 0.5, "trigflow_t")
    np.testing.assert_allclose(edm.c_noise, np.pi / 4, rtol=1e-6)
    default = karras.edm_scalings(jnp.float32(0.5), 0.5)
    assert default.c_noise == karras.noise_conditioning(jnp.float32(0.5))
    for a, b in zip(edm[:3], default[:3]):
        assert a == b
    cm = karras.consistency_scalings(jnp.float32(0.5), 0.5, 0.002, "trigflow_t")
    np.testing.assert_allclose(cm.c_noise, np.pi / 4, rtol=1e-6)


def test_consistency_scalings_boundary_and_interior():
    s = karras.consistency_scalings(jnp.float32(0.002), 0.5, 0.002)
    assert float(s.c_skip) == 1.0 and float(s.c_out) == 0.0
    # σ = 0.502: σ − σ_min = 0.5, so c_skip = 0.25/(0.25 + 0.25) = 0.5 and
    # c_out = 0.5·0.5/√(0.502² + 0.25) = 0.25/√0.502004 = 0.352847 (σ², not (σ−σ_min)², below).
    s = karras.consistency_scalings(jnp.float32(0.502), 0.5, 0.002)
    np.testing.assert_allclose([s.c_skip, s.c_out], [0.5, 0.352847], rtol=1e-5)


def test_consistency_scalings_approach_edm_at_large_sigma():
    edm = karras.edm_scalings(jnp.float32(80.0))
    cm = karras.consistency_scalings(jnp.float32(80.0))
    np.testing.assert_allclose(cm.c_out, edm.c_out, rtol=1e-4)
    np.testing.assert_allclose(cm.c_in, edm.c_in, rtol=1e-7)


class _AnyNet:
    """A stand-in network whose output is large and arbitrary: f must ignore it at σ_min."""

    def apply(self, variables, x, c_noise, labels, train, rngs=None):
        return 1e3 * jnp.sin(x * 7.0 + c_noise[:, None, None, None]) + variables["params"]["b"]


def test_boundary_condition_holds_exactly():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3)) * 40.0
    out = precond.consistency_fn(_AnyNet(), {"b": 5.0}, x, 0.002, sigma_min=0.002)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    # Away from the boundary the network matters.
    out = precond.consistency_fn(_AnyNet(), {"b": 5.0}, x, 1.0, sigma_min=0.002)
    assert not np.allclose(out, x)


def test_denoiser_applies_the_four_scalings():
    # F(x_in, c_noise) = x_in + c_noise, so D = c_skip·x + c_out·(c_in·x + c_noise).
    class Net:
        def apply(self, variables, x, c_noise, labels, train, rngs=None):
            return x + c_noise[:, None, None, None]

    x = jnp.full((2, 1, 1, 1), 2.0)
    out = precond.edm_denoiser(Net(), {}, x, jnp.array([0.5, 0.5]))
    expected = 0.5 * 2.0 + 0.3535534 * (1.4142136 * 2.0 - 0.1732868)
    np.testing.assert_allclose(out.ravel(), [expected, expected], rtol=1e-6)
