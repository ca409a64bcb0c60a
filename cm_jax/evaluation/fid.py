"""Metric math on Inception features: FID / sFID, precision and recall, KID, Inception Score.

Everything here takes feature arrays (``pool3`` [N, 2048], or ``spatial`` [N, 2023] for sFID)
and no network, so the math is testable on constructed point clouds and reusable with any
feature extractor. Each metric is computed as the reference implementation the papers used,
so numbers are comparable with published ones:

* FID (Heusel et al. 2017): Fréchet distance of Gaussians fitted to the features, with the
  covariance square root and its singular-product fallback as in TTUR / pytorch-fid /
  guided-diffusion. Statistics accumulate in float64 by streaming (``FeatureStats``), so 50,000
  samples never need to sit in memory at once and the result does not depend on batching.
* Precision / recall (Kynkäänniemi et al. 2019, k = 3) as guided-diffusion's ``evaluator.py``
  (``ManifoldEstimator``): each set's manifold is the union of balls reaching each point's k-th
  nearest neighbour; precision is the fraction of samples inside the real manifold, recall the
  fraction of real points inside the sample manifold. Distances are computed in blocks.
* KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
  ``(x·y / d + 1)³``, averaged over random subsets, as clean-fid and torch-fidelity.
* Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over 10 splits, as
  the original ``improved-gan`` code. It needs class probabilities from the graph's 2048->1008
  ``softmax/logits`` layer, which the FID weights file (``default_1.pt``) does not contain:
  :func:`classifier_probs` applies weights the user supplies (``classifier.py`` reads them
  from pytorch-fid's weights file).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg, special

# ----------------------------------------------------------------------------------------------
# Streaming statistics
# ----------------------------------------------------------------------------------------------


class FeatureStats:
    """Streaming mean and unbiased covariance of feature vectors, in float64.

    Batches are merged with the pairwise update of Chan, Golub and LeVeque (1979): each batch's
    mean and centred scatter matrix are combined with the running ones, which avoids the
    cancellation of the ``E[xx^T] - mu mu^T`` form and gives the same statistics for any
    batch split. ``metadata`` (strings) travels with the saved file: network, resize, data.
    """

    def __init__(self, metadata: dict[str, str] | None = None):
        self.n = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of (x - mean)(x - mean)^T
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}

    def add(self, features) -> FeatureStats:
        """Accumulate a batch [B, D] of features (numpy or jax, any float dtype)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [batch, dim], got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        n_b, mean_b = x.shape[0], x.mean(axis=0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self.n == 0:
            self.n, self._mean, self._scatter = n_b, mean_b, scatter_b
            return self
        if mean_b.shape != self._mean.shape:
            raise ValueError(f"feature dim {mean_b.shape[0]} != {self._mean.shape[0]}")
        n = self.n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.n = n
        return self

    @property
    def mean(self) -> np.ndarray:
        """mu, float64 [D]."""
        if self.n == 0:
            raise ValueError("no features added")
        return self._mean

    @property
    def cov(self) -> np.ndarray:
        """Sigma, the unbiased covariance (divided by n - 1, as ``np.cov``), float64 [D, D]."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 features, have {self.n}")
        return self._scatter / (self.n - 1)

    def save(self, path: str, sigma_dtype=np.float64) -> None:
        """npz with ``mu``, ``sigma``, ``n`` and ``meta_<key>`` strings.

        ``sigma_dtype=np.float32`` halves the file and changes FID by < 1e-6 (the format of
        ``shared/data/cifar10_fid``); float64 keeps it exact for further accumulation.
        """
        meta = {f"meta_{k}": np.array(v) for k, v in self.metadata.items()}
        np.savez(path, mu=self.mean, sigma=self.cov.astype(sigma_dtype), n=np.int64(self.n), **meta)

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        """Read :meth:`save`'s format (or any npz with mu, sigma, n). More batches can be added
        afterwards: the scatter matrix is recovered as sigma * (n - 1)."""
        with np.load(path) as data:
            stats = cls(
                {k[len("meta_") :]: str(data[k]) for k in data.files if k.startswith("meta_")}
            )
            stats.n = int(data["n"])
            stats._mean = data["mu"].astype(np.float64)
            stats._scatter = data["sigma"].astype(np.float64) * (stats.n - 1)
        return stats


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) (Heusel et al. 2017, Eq. 6 / Dowson
    and Landau 1982), in float64.

    As TTUR / pytorch-fid / guided-diffusion: ``scipy.linalg.sqrtm`` of the product; if that
    is not finite (an almost singular product, e.g. fewer samples than dimensions), retry with
    ``eps`` added to both diagonals; drop an imaginary part that is round-off (diagonal within
    1e-3 of real), raise if it is not.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different sizes: {mu1.shape} {sigma1.shape} vs "
            f"{mu2.shape} {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: singular product; adding {eps} to the diagonal of both covariances",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm``, with its warnings on singular input silenced (the caller checks
    finiteness and falls back, as the reference code does)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return linalg.sqrtm(matrix)


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """FID (or sFID, on spatial features) between two accumulated feature sets."""
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


# ----------------------------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019)
# ----------------------------------------------------------------------------------------------


@jax.jit
def pairwise_sq_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """[|u|, |v|] squared Euclidean distances ||u||² - 2 u·v + ||v||², clamped at 0: one
    matrix product per block (the form of the reference ``DistanceBlock``), in float32."""
    u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
    norm_u = jnp.sum(u * u, axis=1)[:, None]
    norm_v = jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(norm_u - 2.0 * jnp.matmul(u, v.T, precision="highest") + norm_v, 0.0)


@functools.partial(jax.jit, static_argnames="count")
def _smallest(distances: jax.Array, count: int) -> jax.Array:
    """The ``count`` smallest entries of each row, ascending."""
    return -jax.lax.top_k(-distances, count)[0]


def manifold_radii(
    features, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000
) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour in the same set.

    The point itself is neighbour 0 (distance 0), so this is entry ``k`` of the sorted row, as
    guided-diffusion's ``manifold_radii`` (``np.partition`` at ``nhood_sizes``).
    """
    features = np.asarray(features, np.float32)
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} points, got {n}")
    radii = np.empty(n, np.float32)
    for r0 in range(0, n, row_batch_size):
        rows = features[r0 : r0 + row_batch_size]
        nearest = []
        for c0 in range(0, n, col_batch_size):
            block = pairwise_sq_distances(rows, features[c0 : c0 + col_batch_size])
            nearest.append(np.asarray(_smallest(block, min(k + 1, block.shape[1]))))
        radii[r0 : r0 + len(rows)] = np.sort(np.concatenate(nearest, axis=1), axis=1)[:, k]
    return radii


@jax.jit
def _inside_block(batch_1, radii_1, batch_2, radii_2):
    """For one block: which points of batch 1 lie in a ball of set 2, and the reverse."""
    d = pairwise_sq_distances(batch_1, batch_2)
    return jnp.any(d <= radii_2[None, :], axis=1), jnp.any(d <= radii_1[:, None], axis=0)


def precision_recall(
    real_features,
    fake_features,
    k: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), guided-diffusion's evaluation.

    Precision: fraction of ``fake_features`` inside the k-NN manifold of ``real_features``
    (sample quality). Recall: fraction of ``real_features`` inside the manifold of
    ``fake_features`` (coverage). A point is inside when its squared distance to some point of
    the other set is at most that point's radius (``<=``, so identical sets give 1 and 1).
    Distances are float32 (guided-diffusion tries float16 first and falls back to float32;
    float16 only saves time and can flip points that sit on a ball's surface).
    """
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    radii_real = manifold_radii(real, k, row_batch_size, col_batch_size)
    radii_fake = manifold_radii(fake, k, row_batch_size, col_batch_size)
    real_in = np.zeros(len(real), bool)  # real point inside the fake manifold -> recall
    fake_in = np.zeros(len(fake), bool)  # fake point inside the real manifold -> precision
    for r0 in range(0, len(real), row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, len(fake), col_batch_size):
            c1 = c0 + col_batch_size
            a, b = _inside_block(real[r0:r1], radii_real[r0:r1], fake[c0:c1], radii_fake[c0:c1])
            real_in[r0:r1] |= np.asarray(a)
            fake_in[c0:c1] |= np.asarray(b)
    return float(fake_in.mean()), float(real_in.mean())


# ----------------------------------------------------------------------------------------------
# KID (Bińkowski et al. 2018)
# ----------------------------------------------------------------------------------------------


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³, the KID kernel (degree 3, gamma 1/d, coef 1)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two equal-size samples: the diagonals k(x_i, x_i) are left out."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    real_features, fake_features, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and standard deviation of unbiased MMD² over ``num_subsets`` random subsets of
    ``min(subset_size, N_real, N_fake)`` points from each set, drawn without replacement (the
    defaults of torch-fidelity and clean-fid). Unbiased, so it is ~0 (and can be slightly
    negative) for samples of one distribution, whatever their size. float64, numpy.
    """
    # Only the subsets go to float64: 50,000 features of each set would take 800 MB apiece.
    real, fake = np.asarray(real_features), np.asarray(fake_features)
    m = min(len(real), len(fake), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 features in each set")
    rng = np.random.default_rng(seed)

    def subset(features):
        return features[rng.choice(len(features), m, replace=False)].astype(np.float64)

    mmds = [mmd2_unbiased(subset(fake), subset(real)) for _ in range(num_subsets)]
    return float(np.mean(mmds)), float(np.std(mmds))


# ----------------------------------------------------------------------------------------------
# Inception Score (Salimans et al. 2016)
# ----------------------------------------------------------------------------------------------


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` consecutive splits, as
    the original ``improved-gan`` code; p(y) is the mean prediction within each split.

    ``probs`` [N, classes] are softmax outputs of the TF graph's 1008-way classifier (see
    :func:`classifier_probs`); 0 log 0 is taken as 0. Between 1 (every image gets the same
    prediction) and the number of classes (confident and evenly spread predictions).
    """
    probs = np.asarray(probs, np.float64)
    n = probs.shape[0]
    if n < splits:
        raise ValueError(f"{n} predictions cannot make {splits} splits")
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = special.xlogy(part, part) - special.xlogy(part, marginal)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def classifier_probs(pool3, weight, bias=None) -> np.ndarray:
    """softmax(pool3 · W (+ b)) with user-supplied weights of the graph's ``softmax/logits``
    layer (W [2048, 1008], b [1008]; pytorch-fid's ``fc.weight``.T and ``fc.bias``).

    For the Inception Score leave ``bias`` out: the original IS code (improved-gan's
    ``inception_score.py``) and guided-diffusion's evaluator both take W as the input of the
    op ``softmax/logits/MatMul`` and compute softmax(pool3 · W), without the bias (torch-fidelity's
    ``logits_unbiased``). With ``bias`` this is the graph's own ``softmax:0``.
    """
    logits = np.asarray(pool3, np.float64) @ np.asarray(weight, np.float64)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    return special.softmax(logits, axis=1)
