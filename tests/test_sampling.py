"""Samplers: CM Algorithm 1 against one-step sampling and a hand-written loop, per-sample noise,
time-point checks, and EDM's Heun / Euler samplers against probability-flow ODEs with closed
form solutions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import tiny_model

from cm_jax import precond, sampling

SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def model():
    return tiny_model(SHAPE)


def _noise(indices, seed=0):
    indices = jnp.asarray(indices)
    return sampling.sample_noise(seed, indices, SHAPE), sampling.sample_keys(seed + 1, indices)


# ---------------------------------------------------------------------------- CM Algorithm 1
def test_multistep_with_one_time_point_is_onestep_bitwise(model):
    net, params = model
    z, _ = _noise(range(4))
    one = jax.jit(lambda p, z: sampling.onestep_sample(net, p, z))(params, z)
    multi = jax.jit(lambda p, z: sampling.multistep_sample(net, p, z, [80.0]))(params, z)
    np.testing.assert_array_equal(np.asarray(multi), np.asarray(one))


def test_multistep_follows_algorithm_1(model):
    """Two steps against the loop written out: x0 = clip(f(σ_0 z, σ_0)),
    x = x0 + √(σ_1² − σ_min²)·z_1, x0 = clip(f(x, σ_1))."""
    net, params = model
    z, keys = _noise(range(3))
    sigmas = [80.0, 0.821]
    got = jax.jit(lambda p, z, k: sampling.multistep_sample(net, p, z, sigmas, noise_rng=k))(
        params, z, keys
    )

    f = jax.jit(lambda x, s: jnp.clip(precond.consistency_fn(net, params, x, s), -1.0, 1.0))
    z1 = jnp.stack([jax.random.normal(jax.random.fold_in(k, 1), SHAPE) for k in keys])
    x0 = f(80.0 * z, 80.0)
    want = f(x0 + np.sqrt(0.821**2 - 0.002**2) * z1, 0.821)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, x0, atol=1e-3)  # the second step did something


# ---------------------------------------------------------------------------- per-sample noise
def test_sample_noise_is_fold_in_of_the_index():
    noise = sampling.sample_noise(7, jnp.array([3, 11]), SHAPE)
    want = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), 11), SHAPE)
    np.testing.assert_array_equal(noise[1], want)


def test_samples_do_not_depend_on_the_batch_they_are_drawn_in(model):
    """Indices 0..3 in one batch of 4 and in two batches of 2 (in another order): the same
    noise bit for bit and the same images."""
    net, params = model
    sample = jax.jit(
        lambda p, z, k: sampling.multistep_sample(net, p, z, [80.0, 1.5, 0.3], noise_rng=k)
    )
    z, keys = _noise(range(4))
    whole = sample(params, z, keys)
    parts = []
    for idx in ([2, 3], [0, 1]):
        z_part, keys_part = _noise(idx)
        np.testing.assert_array_equal(z_part, z[np.asarray(idx)])
        parts.append(sample(params, z_part, keys_part))
    np.testing.assert_allclose(jnp.concatenate(parts[::-1]), whole, rtol=0, atol=1e-6)


def test_noise_rng_must_hold_one_key_per_sample(model):
    net, params = model
    z, keys = _noise(range(4))
    with pytest.raises(ValueError, match="one key per sample"):
        sampling.multistep_sample(net, params, z, [80.0, 1.0], noise_rng=keys[:3])
    with pytest.raises(ValueError, match="one key per sample"):
        sampling.multistep_sample(net, params, z, [80.0, 1.0], noise_rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="need noise_rng"):
        sampling.multistep_sample(net, params, z, [80.0, 1.0])


# ---------------------------------------------------------------------------- time points
def test_sigmas_from_indices_official_convention():
    # Index i of the descending 40-point grid: (80^{1/7} + i/39·(0.002^{1/7} − 80^{1/7}))^7;
    # i = 22 is 1.382368. The final index 39 (σ_min) only sets zero noise: dropped.
    np.testing.assert_allclose(
        sampling.sigmas_from_indices((0, 22, 39), 40), [80.0, 1.382368], rtol=1e-6
    )
    np.testing.assert_allclose(
        sampling.sigmas_from_indices((0, 17), 40), [80.0, 4.365562], rtol=1e-6
    )
    assert list(sampling.sigmas_from_indices((0, 39), 40)) == [80.0]


@pytest.mark.parametrize(
    "ts, message",
    [
        ((0, 22, 22, 39), "strictly increasing"),
        ((0, 30, 22), "strictly increasing"),
        ((0, 22, 40), r"\[0, N−1\] = \[0, 39\]"),
        ((1, 22, 39), "start at 0"),
        ((0, 2.5), "integers"),
        ((), "non-empty"),
    ],
)
def test_bad_indices_are_named(ts, message):
    with pytest.raises(ValueError, match=message):
        sampling.sigmas_from_indices(ts, 40)


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([80.0, 80.0], "strictly decreasing, got \\[80.0, 80.0\\]"),
        ([1.0, 5.0], "strictly decreasing"),
        ([5.0, -1.0], "positive"),
        ([90.0, 1.0], "≤ σ_max = 80.0"),
        ([80.0, 0.001], "≥ σ_min = 0.002"),
        ([], "non-empty"),
    ],
)
def test_bad_time_points_are_named(sigmas, message):
    with pytest.raises(ValueError, match=message):
        sampling.validate_sigmas(sigmas, 80.0, 0.002)


def test_multistep_checks_its_time_points(model):
    net, params = model
    z, keys = _noise(range(2))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampling.multistep_sample(net, params, z, [0.5, 80.0], noise_rng=keys)
    with pytest.raises(ValueError, match="σ_max"):
        sampling.multistep_sample(net, params, z, [100.0], sigma_max=80.0)


# ---------------------------------------------------------------------------- EDM samplers
def _data_point(x):
    """Data = one point x0: D(x; σ) = x0 exactly, and the PF-ODE dx/dσ = (x − x0)/σ is solved by
    x(σ) = x0 + σ/σ_max·(x(σ_max) − x0), a straight line that both solvers follow exactly."""
    return lambda v, sigma: jnp.broadcast_to(x, v.shape)


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("num_steps", [2, 7, 18])
def test_edm_lands_on_a_single_data_point(solver, num_steps):
    x0 = jnp.linspace(-0.9, 0.9, np.prod(SHAPE)).reshape((1,) + SHAPE)
    z, keys = _noise(range(3))
    run = jax.jit(
        lambda z, k, churn: sampling.edm_sample(
            _data_point(x0),
            z,
            sampling.edm_sigmas(num_steps),
            solver=solver,
            S_churn=churn,
            noise_rng=k,
        ),
        static_argnums=2,
    )
    out = run(z, keys, 0.0)
    np.testing.assert_allclose(out, jnp.broadcast_to(x0, out.shape), atol=1e-5)
    # EDM Algorithm 2's churn moves along the line and back onto it: still x0.
    churned = run(z, keys, 40.0)
    np.testing.assert_allclose(churned, jnp.broadcast_to(x0, out.shape), atol=1e-5)


def _gaussian_ratio(num_steps, heun):
    """x(0)/x(σ_max) of the Heun / Euler recursion for N(0, s²I) data, s = 0.5, in float64."""
    s, sig = 0.5, np.append(np.asarray(sampling.edm_sigmas(num_steps), np.float64)[:-1], 0.0)
    slope = lambda x, t: x * t / (s**2 + t**2)
    x = 1.0
    for a, b in zip(sig[:-1], sig[1:]):
        d = slope(x, a)
        x = (
            x + (b - a) * 0.5 * (d + slope(x + (b - a) * d, b))
            if heun and b > 0
            else x + (b - a) * d
        )
    return x


def test_edm_on_gaussian_data_against_the_exact_solution():
    """Data N(0, s²I): D(x; σ) = s²/(s²+σ²)·x and x(σ) = x(σ_max)·√((s²+σ²)/(s²+σ_max²))."""
    s = 0.5
    z, _ = _noise(range(4))
    exact = 80.0 * z * s / np.sqrt(s**2 + 80.0**2)
    denoise = lambda x, sigma: s**2 / (s**2 + sigma**2) * x
    err = {}
    for solver in ("heun", "euler"):
        out = sampling.edm_sample(denoise, z, sampling.edm_sigmas(18), solver=solver)
        err[solver] = float(jnp.max(jnp.abs(out / exact - 1.0)))
        # The solver is the recursion it claims to be (float64 reference, same grid).
        np.testing.assert_allclose(
            out, 80.0 * z * _gaussian_ratio(18, solver == "heun"), rtol=1e-5, atol=1e-7
        )
    assert err["heun"] < 0.06  # 5.5 % with 18 steps (the curvature sits around σ = s)
    assert err["euler"] > 2.5 * err["heun"]  # 15 %
    finer = sampling.edm_sample(denoise, z, sampling.edm_sigmas(40), solver="heun")
    assert float(jnp.max(jnp.abs(finer / exact - 1.0))) < 0.011  # second order: ~1/N²


def test_edm_network_samplers(model):
    net, params = model
    z, keys = _noise(range(3))
    heun = jax.jit(functools.partial(sampling.edm_network_sample, net, num_steps=4))
    euler = jax.jit(
        functools.partial(sampling.edm_network_sample, net, solver="euler", num_steps=4)
    )
    a, b = heun(params, z), euler(params, z)
    assert a.shape == z.shape and float(jnp.max(jnp.abs(a))) <= 1.0
    assert not np.allclose(a, b)
    churn = jax.jit(functools.partial(sampling.edm_network_sample, net, num_steps=4, S_churn=10.0))
    c = churn(params, z, noise_rng=keys)
    assert not np.allclose(a, c)
    # Churn noise is per sample: sample 2 alone gets the same image.
    np.testing.assert_allclose(churn(params, z[2:], noise_rng=keys[2:]), c[2:], atol=1e-4)
    with pytest.raises(ValueError, match="noise_rng"):
        sampling.edm_network_sample(net, params, z, solver="euler", num_steps=4, S_churn=1.0)
