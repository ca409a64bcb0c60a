"""Tests for the metric math of cm_jax.evaluation.fid, on constructed features with known
answers."""

import os

import numpy as np
import pytest
from scipy import linalg

from cm_jax.evaluation import fid

_STATS = os.path.join("shared", "data", "cifar10_fid", "cifar10_train_tf_inception.npz")
# shared/ sits beside the checkout (CI) or at /work/shared (development machines).
REFERENCE_STATS = next(
    (
        p
        for p in [
            os.path.join(os.path.dirname(__file__), "..", "..", _STATS),
            os.path.join("/work", _STATS),
        ]
        if os.path.exists(p)
    ),
    "",
)


def _random_stats(rng, d, n=50, shift=0.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------


def _fid_by_eigenvalues(mu1, s1, mu2, s2):
    """Independent route: Tr (S1 S2)^½ = Σ √λ of the symmetric S1^½ S2 S1^½."""
    root1 = linalg.sqrtm(s1).real
    eig = np.clip(linalg.eigvalsh(root1 @ s2 @ root1), 0, None)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))


def test_frechet_distance_matches_eigenvalue_formula():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_stats(rng, 12)
    mu2, s2 = _random_stats(rng, 12, shift=0.5)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fid_by_eigenvalues(mu1, s1, mu2, s2), rel=1e-8)
    assert got == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-8)  # symmetric


def test_frechet_distance_zero_for_identical_stats():
    mu, s = _random_stats(np.random.default_rng(1), 16)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8


def test_frechet_distance_one_dimensional_closed_form():
    # d² between N(m1, v1) and N(m2, v2) is (m1 - m2)² + (√v1 - √v2)².
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_singular_fallback(monkeypatch):
    rng = np.random.default_rng(2)
    mu1, s1 = _random_stats(rng, 6)
    mu2, s2 = _random_stats(rng, 6)
    real_sqrtm, calls = fid._sqrtm, []

    def first_call_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(fid, "_sqrtm", first_call_fails)
    with pytest.warns(UserWarning, match="singular product"):
        got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    offset = np.eye(6) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    assert got == pytest.approx(_fid_by_eigenvalues(mu1, s1, mu2, s2), rel=1e-5)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------------------


def _features(n=600, d=10, seed=3):
    rng = np.random.default_rng(seed)
    # A large common offset: the E[xx^T] - mu mu^T form would lose digits here.
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 1e3).astype(np.float32)


@pytest.mark.parametrize("splits", [[600], [1] * 600, [7, 300, 1, 292], [599, 1]])
def test_feature_stats_equal_numpy_for_any_batching(splits):
    x = _features()
    stats = fid.FeatureStats()
    for batch in np.split(x, np.cumsum(splits)[:-1]):
        stats.add(batch)
    x64 = x.astype(np.float64)
    assert stats.n == len(x)
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)


def test_feature_stats_save_load_and_continue(tmp_path):
    x = _features()
    stats = fid.FeatureStats({"network": "tf_inception_2015", "resize": "tf1_bilinear"})
    stats.add(x[:400]).save(tmp_path / "stats.npz")
    loaded = fid.FeatureStats.load(str(tmp_path / "stats.npz"))
    assert loaded.n == 400 and loaded.metadata == stats.metadata
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_allclose(loaded.cov, stats.cov, rtol=1e-14)
    loaded.add(x[400:])  # resuming accumulation from a saved file
    np.testing.assert_allclose(
        loaded.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9
    )
    with np.load(tmp_path / "stats.npz") as data:
        assert {"mu", "sigma", "n"} <= set(data.files)


def test_feature_stats_errors():
    stats = fid.FeatureStats()
    with pytest.raises(ValueError):
        _ = stats.mean
    stats.add(np.zeros((1, 4)))
    with pytest.raises(ValueError):
        _ = stats.cov  # one sample has no unbiased covariance
    with pytest.raises(ValueError):
        stats.add(np.zeros((2, 5)))
    with pytest.raises(ValueError):
        stats.add(np.zeros(4))


@pytest.mark.skipif(not os.path.exists(REFERENCE_STATS), reason="shared CIFAR-10 FID stats absent")
def test_loads_the_shared_cifar10_reference_statistics():
    stats = fid.FeatureStats.load(REFERENCE_STATS)
    assert stats.n == 50_000 and stats.mean.shape == (2048,) and stats.cov.shape == (2048, 2048)
    assert stats.mean.dtype == np.float64 and np.all(stats.mean >= 0)  # pool3 follows a ReLU


# ----------------------------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------------------------


def _brute_force_pr(real, fake, k=3):
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_real = np.sort(d(real, real), axis=1)[:, k]
    r_fake = np.sort(d(fake, fake), axis=1)[:, k]
    d_rf = d(real, fake)
    precision = np.mean(np.any(d_rf <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d_rf <= r_fake[None, :], axis=1))
    return precision, recall


def test_precision_recall_identical_sets_are_one():
    x = np.random.default_rng(4).normal(size=(200, 16))
    assert fid.precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_are_zero():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(150, 16)), rng.normal(size=(120, 16)) + 100.0
    assert fid.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_half_of_samples_off_manifold():
    # Samples = the real points plus as many far away: half of them are realistic
    # (precision 1/2), and every real point is covered (recall 1).
    rng = np.random.default_rng(6)
    real = rng.normal(size=(100, 8))
    fake = np.concatenate([real, rng.normal(size=(100, 8)) + 50.0])
    assert fid.precision_recall(real, fake) == (0.5, 1.0)


def test_precision_recall_matches_brute_force_with_small_blocks():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(90, 5)).astype(np.float32)
    fake = (rng.normal(size=(70, 5)) * 1.3 + 0.4).astype(np.float32)
    want = _brute_force_pr(real.astype(np.float64), fake.astype(np.float64))
    got = fid.precision_recall(real, fake, row_batch_size=32, col_batch_size=25)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    assert got == pytest.approx(want, abs=1.5 / 70)  # at most one ball-surface tie may flip


def test_manifold_radii_is_kth_neighbour_distance():
    points = np.arange(10, dtype=np.float32)[:, None]  # 0, 1, ..., 9 on a line
    radii = fid.manifold_radii(points, k=3, row_batch_size=4, col_batch_size=3)
    # 3rd nearest other point: for 0 it is 3 (squared 9); for 5 it is 2 away (4 and 6 at 1).
    np.testing.assert_allclose(radii[[0, 5, 9]], [9.0, 4.0, 9.0])


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_explicit_sums():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.3
    k = lambda a, b: (a @ b / 4 + 1) ** 3
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert fid.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 32))
    same, same_std = fid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std / np.sqrt(20) + 1e-3
    assert shifted > 50 * abs(same) and shifted > 0.05


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.full((100, 10), 0.1))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_class_count():
    probs = np.eye(10)[np.arange(200) % 10]  # one-hot, every split holds each class equally
    mean, std = fid.inception_score(probs, splits=10)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_improved_gan_formula():
    probs = np.random.default_rng(10).dirichlet(np.ones(7) * 0.3, size=50)
    scores = []
    for i in range(5):
        part = probs[i * 10 : (i + 1) * 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert fid.inception_score(probs, splits=5) == pytest.approx((np.mean(scores), np.std(scores)))


def test_classifier_probs_is_a_softmax():
    rng = np.random.default_rng(11)
    p = fid.classifier_probs(rng.normal(size=(5, 8)), rng.normal(size=(8, 3)), np.ones(3))
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert np.all(p > 0)
