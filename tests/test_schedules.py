"""Curricula N(k), μ(k), pair sampling and weightings against hand-worked values."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from cm_jax import karras, schedules


@pytest.mark.parametrize("k, expected", [(0, 2), (200_000, 76), (400_000, 107), (800_000, 151)])
def test_ct_num_scales_cifar10(k, expected):
    # k = 200k: √(¼·(151² − 4) + 4) = √5703.25 = 75.52, ⌈74.52⌉ = 75, N = 76.
    assert int(schedules.ct_num_scales(k, 800_000, 2, 150)) == expected


def test_ct_target_ema_both_formulas():
    # N = 2: official exp(2·ln 0.9/1) = 0.81; paper exp(2·ln 0.9/2) = 0.9.
    assert float(schedules.ct_target_ema(2, 2, 0.9, "official")) == pytest.approx(0.81, rel=1e-6)
    assert float(schedules.ct_target_ema(2, 2, 0.9, "paper")) == pytest.approx(0.9, rel=1e-6)
    # N = 76 and 151 (k = 200k, 800k):
    # exp(−0.2107210/75) = 0.997194, exp(−0.2107210/150) = 0.998596.
    assert float(schedules.ct_target_ema(76, 2, 0.9, "official")) == pytest.approx(
        0.997194, abs=1e-6
    )
    assert float(schedules.ct_target_ema(151, 2, 0.9, "official")) == pytest.approx(
        0.998596, abs=1e-6
    )
    with pytest.raises(ValueError, match="formula"):
        schedules.ct_target_ema(2, 2, 0.9, "neither")


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 11),
        (49_999, 11),
        (50_000, 21),
        (100_000, 41),
        (300_000, 641),
        (350_000, 1281),
        (399_999, 1281),
        (10_000_000, 1281),
    ],
)
def test_ict_num_scales(k, expected):
    # K' = ⌊400k / (log2⌊1280/10⌋ + 1)⌋ = 400k/8 = 50k.
    assert schedules.ict_stage_length(400_000, 10, 1280) == 50_000
    assert int(schedules.ict_num_scales(k, 400_000, 10, 1280)) == expected


def test_schedules_are_jit_safe_in_the_step():
    c = ml_collections.ConfigDict(dict(kind="ct", s0=2, s1=150, mu0=0.9, mu_formula="official"))
    n, mu = jax.jit(lambda k: schedules.num_scales_and_target_ema(k, c, 800_000))(200_000)
    assert int(n) == 76 and float(mu) == pytest.approx(0.997194, abs=1e-6)
    c = ml_collections.ConfigDict(dict(kind="fixed", num_scales=18, target_ema=0.0))
    assert schedules.max_num_scales(c) == 18
    with pytest.raises(ValueError, match="schedule kind"):
        schedules.max_num_scales(ml_collections.ConfigDict(dict(kind="cosine")))


def test_lognormal_pair_probabilities_match_the_normal_cdf():
    n, max_scales = 11, 20
    logits = schedules.lognormal_pair_logits(jnp.int32(n), max_scales, -1.1, 2.0)
    probs = np.asarray(jax.nn.softmax(logits))
    assert np.all(probs[n - 1 :] == 0.0)
    sigmas = np.asarray(karras.karras_sigmas(n), np.float64)
    mass = np.diff(stats.norm.cdf(np.log(sigmas), loc=-1.1, scale=2.0))
    np.testing.assert_allclose(probs[: n - 1], mass / mass.sum(), rtol=1e-4)


def test_lognormal_sampling_frequencies_and_range():
    # A buffer of 2N logits, not the curriculum's 1281: the draw is Gumbel-max over the whole
    # buffer, and 200k draws over 1281 logits take ~40 s on a 2-core CPU.
    n, buffer = 11, 22
    i = schedules.sample_pair_index(
        jax.random.PRNGKey(0), 200_000, jnp.int32(n), "lognormal", buffer, -1.1, 2.0
    )
    i = np.asarray(i)
    assert i.min() >= 0 and i.max() <= n - 2
    freq = np.bincount(i, minlength=n - 1) / i.size
    expected = np.asarray(jax.nn.softmax(schedules.lognormal_pair_logits(n, buffer)))[: n - 1]
    np.testing.assert_allclose(freq, expected, atol=4e-3)
    # The logits do not depend on the buffer's length beyond it.
    np.testing.assert_allclose(
        schedules.lognormal_pair_logits(n, 1281)[: buffer - 1],
        schedules.lognormal_pair_logits(n, buffer),
        rtol=1e-6,
    )


def test_uniform_sampling_range():
    i = np.asarray(schedules.sample_pair_index(jax.random.PRNGKey(1), 10_000, 5, "uniform", 5))
    assert set(np.unique(i)) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "weighting, expected",
    [("uniform", 1.0), ("ict", 1.0 / 0.5), ("snr", 0.25), ("snrp1", 1.25), ("truncated_snr", 1.0)],
)
def test_pair_weights(weighting, expected):
    w = schedules.pair_weight(jnp.float32(1.5), jnp.float32(2.0), weighting)
    assert float(w) == pytest.approx(expected)


def test_edm_weight_cancels_c_out():
    # λ(0.5) = (0.25 + 0.25)/(0.5·0.5)² = 8, and c_out(0.5)² = 0.125.
    assert float(schedules.edm_weight(jnp.float32(0.5))) == pytest.approx(8.0)
    sigma = jnp.array([0.01, 1.0, 50.0])
    c_out = karras.edm_scalings(sigma).c_out
    np.testing.assert_allclose(c_out**2 * schedules.edm_weight(sigma), 1.0, rtol=1e-5)


def test_edm_sigma_is_lognormal():
    sigma = np.asarray(schedules.edm_sample_sigma(jax.random.PRNGKey(2), 100_000, -1.2, 1.2))
    assert np.log(sigma).mean() == pytest.approx(-1.2, abs=0.02)
    assert np.log(sigma).std() == pytest.approx(1.2, abs=0.02)
