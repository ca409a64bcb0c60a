"""--mode=stats and --mode=eval on real CIFAR-10 images (a handful: the network is slow on CPU)."""

import json
import os

import numpy as np
import pytest

from cm_jax.evaluation import evaluate, fid, search
from configs import cifar10_ict

N = 8


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory, cifar10_dir):
    """Two tiny 'train' shards of real CIFAR-10 test images and an npz of other ones."""
    images = np.load(f"{cifar10_dir}/test.npz")["images"]
    folder = tmp_path_factory.mktemp("cifar")
    for k in range(2):
        np.savez(
            folder / f"train-{k:05d}-of-00002.npz",
            images=images[k * N // 2 : (k + 1) * N // 2],
            labels=np.zeros(N // 2, np.int64),
        )
    np.savez(folder / "samples.npz", arr_0=images[N : 2 * N])
    return folder


def _config(folder, npz):
    config = cifar10_ict.get_config()
    config.data.dir = str(folder)
    config.eval.update(inception_path=npz, batch_size=8, ref_stats_out=str(folder / "ref.npz"))
    return config


def test_stats_then_eval_of_an_npz(cifar_shards, inception_weights, tmp_path, cifar10_dir):
    _, npz = inception_weights
    config = _config(cifar_shards, npz)
    config.eval.ref_features_max = N - 2  # Features of the first 6 images only.
    path = evaluate.run_stats(config, str(tmp_path))
    with np.load(path) as f:
        assert (
            int(f["n"]) == N
            and f["mu"].shape == (2048,)
            and f["sigma_spatial"].shape == (2023, 2023)
        )
        assert str(f["meta_resize"]) == evaluate.RESIZE_CONVENTION
        assert str(f["meta_pool3_features"]) == str(N - 2)
    stored = np.load(evaluate.reference_features_path(path))
    config.eval.update(ref_stats=path, samples_npz=str(cifar_shards / "samples.npz"))
    row = evaluate.run_eval(config, str(tmp_path))
    # The same computation by hand from the features.
    extractor = evaluate.FeatureExtractor(evaluate.create_mesh(), npz, 8)
    ref = extractor.features(np.load(f"{cifar10_dir}/test.npz")["images"][:N])[0]
    ours = extractor.features(np.load(cifar_shards / "samples.npz")["arr_0"])[0]
    assert stored.dtype == np.float32 and stored.shape == (N - 2, 2048)
    np.testing.assert_allclose(stored, ref[: N - 2], rtol=1e-6, atol=1e-6)
    expected = fid.frechet_distance(
        ours.mean(0), np.cov(ours, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False)
    )
    assert row["fid"] == pytest.approx(expected, rel=1e-6)
    assert row["fid"] > 0 and "sfid" in row and row["num_samples"] == N
    precision, recall = fid.precision_recall(stored, ours, k=3)
    kid, kid_std = fid.kernel_inception_distance(stored, ours)
    assert (row["precision"], row["recall"]) == pytest.approx((precision, recall), abs=1e-12)
    assert (row["kid"], row["kid_std"]) == pytest.approx((kid, kid_std), rel=1e-5)
    assert row["ref_features"] == N - 2 and row["kid"] != 0
    assert row["inception_score"] == evaluate.NO_CLASSIFIER
    logged = [json.loads(line) for line in open(tmp_path / "eval" / "metrics.jsonl")]
    assert logged[-1]["fid"] == row["fid"]


def test_missing_reference_is_a_clear_error(cifar_shards, tmp_path):
    config = _config(cifar_shards, "")
    config.eval.ref_stats = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="--mode=stats"):
        evaluate.run_eval(config, str(tmp_path))


@pytest.fixture(autouse=True, scope="module")
def fast_trace_sqrtm():
    """FID's matrix square root replaced by one with the same trace, which is all FID reads:
    diag(√λ) over the eigenvalues λ of the product (the principal root's eigenvalues are the
    principal roots of the product's). scipy's Schur-based `sqrtm` of a 2048 × 2048 product
    takes 17-25 s on a 2-core CI machine, `eigvals` 4-5 s. The covariances here are of a few
    images, so their product has low rank r and maps everything into its column space: its
    nonzero eigenvalues are those of its r × r restriction to that space (a product of full
    rank falls back to all 2048). These tests check the plumbing around the metric; `sqrtm`
    itself is tested in test_fid_metrics.py."""
    sketch_size = 64

    def eigenvalues(matrix):
        if np.array_equal(matrix, matrix.T):
            return np.linalg.eigvalsh(matrix).astype(complex)
        return np.linalg.eigvals(matrix).astype(complex)

    def sqrtm(matrix):
        sketch = matrix @ np.random.default_rng(0).standard_normal((len(matrix), sketch_size))
        basis, singular, _ = np.linalg.svd(sketch, full_matrices=False)
        rank = int(np.sum(singular > singular[0] * 1e-10))
        if rank < sketch_size:  # The column space is found whole.
            basis = basis[:, :rank]
            return np.diag(np.sqrt(eigenvalues(basis.T @ matrix @ basis)))
        return np.diag(np.sqrt(eigenvalues(matrix)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fid, "_sqrtm", sqrtm)
        yield


@pytest.fixture(scope="module")
def trained_run(tiny_shards, inception_weights, tmp_path_factory):
    """A 4-step iCT run on 16×16 images that logged its FID every 2 steps, and a stand-in
    reference (mu = 0, sigma = I: the metric's plumbing, not its value, is under test here)."""
    from cm_jax import trainer

    _, npz = inception_weights
    workdir = tmp_path_factory.mktemp("run")
    ref = workdir / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048), n=10)
    config = cifar10_ict.get_config("test")
    config.data.dir = tiny_shards
    config.train.update(fid_every=2, fid_num_samples=4, sample_every=4)
    config.eval.update(ref_stats=str(ref), inception_path=npz, batch_size=8)
    trainer.train_and_evaluate(config, str(workdir), [evaluate.make_fid_hook(config)])
    return config, workdir


def test_fid_is_logged_during_training(trained_run):
    _, workdir = trained_run
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    fids = {row["step"]: row["fid"] for row in rows if "fid" in row}
    assert sorted(fids) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fids.values())


def test_ternary_search_on_integers_and_reals():
    calls = []
    best, value, values = search.ternary_search(
        lambda x: calls.append(x) or (x - 13) ** 2, 1, 38, integer=True
    )
    assert best == 13 and value == 0 and len(calls) == len(set(calls)) < 38
    best, value, _ = search.ternary_search(
        lambda u: (u - 0.3) ** 2 + 1.0, -3.0, 3.0, integer=False, iterations=30
    )
    assert best == pytest.approx(0.3, abs=1e-3) and value == pytest.approx(1.0, abs=1e-5)


def test_search_mode_records_every_point_and_the_best(trained_run):
    config, workdir = trained_run
    config = config.copy_and_resolve_references()
    config.search.update(kind="index", num_scales=6, num_samples=4)
    sigmas, value = search.run_search(config, str(workdir))
    rows = [json.loads(line) for line in open(workdir / "eval" / "search.jsonl")]
    points = {row["x"]: row["fid"] for row in rows if "best" not in row}
    assert set(points) <= {1.0, 2.0, 3.0, 4.0} and len(points) >= 3
    assert rows[-1]["fid"] == min(points.values()) == value and len(sigmas) == 2


def test_reference_features_must_match_their_statistics(tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4), n=10, meta_pool3_features="5")
    assert evaluate._load_reference_features(str(ref), fid.FeatureStats.load(str(ref))) is None
    np.save(evaluate.reference_features_path(str(ref)), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="ref_pool3.npy .* does not belong to .*--mode=stats"):
        evaluate._load_reference_features(str(ref), fid.FeatureStats.load(str(ref)))


class _PixelExtractor:
    """Stands in for FeatureExtractor, without the slow network: the features are the pixels,
    repeated to 2048 (pool3) and 2023 (spatial) values."""

    batch_size = 2  # run_stats then works in chunks of 20.

    def __init__(self, *args):
        pass

    def weights_sha1(self):
        return "pixels"

    def features(self, images):
        flat = np.asarray(images, np.float32).reshape(len(images), -1)
        repeated = np.tile(flat, (1, -(-2048 // flat.shape[1])))
        return repeated[:, :2048], repeated[:, :2023]


def test_stats_write_the_first_images_features_and_drop_stale_ones(
    tiny_shards, tmp_path, monkeypatch
):
    monkeypatch.setattr(evaluate, "FeatureExtractor", _PixelExtractor)
    config = cifar10_ict.get_config("test")
    config.data.dir = tiny_shards
    config.eval.update(ref_features_max=30, ref_stats_out=str(tmp_path / "ref.npz"))
    path = evaluate.run_stats(config, str(tmp_path))  # 80 images; features of 20 + 10 of them.
    images = np.concatenate(
        [np.load(f"{tiny_shards}/train-0000{k}-of-00002.npz")["images"] for k in range(2)]
    )
    stored = np.load(evaluate.reference_features_path(path))
    np.testing.assert_array_equal(stored, _PixelExtractor().features(images[:30])[0])
    with np.load(path) as f:
        assert int(f["n"]) == 80 and str(f["meta_pool3_features"]) == "30"
    config.eval.ref_features_max = 0  # New statistics at the same path.
    evaluate.run_stats(config, str(tmp_path))
    assert not os.path.exists(evaluate.reference_features_path(path))


def test_progress_keeps_feature_chunks_and_needs_them_to_resume(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (9, 4, 4, 3), dtype=np.uint8)
    prefix = str(tmp_path / "partial" / "tag")
    stats = evaluate.ImageStats({}, keep_features=True)
    for chunk in (images[:5], images[5:]):
        stats.add(_PixelExtractor(), chunk)
        stats.save_progress(prefix, done=stats.pool3.n)
    resumed, done = evaluate.ImageStats.load_progress(prefix, keep_features=True)
    assert done == 9 and resumed.pool3.n == 9
    np.testing.assert_array_equal(resumed.features, _PixelExtractor().features(images)[0])
    os.remove(evaluate._feature_chunk_path(prefix, 5))  # A chunk lost: start over.
    assert evaluate.ImageStats.load_progress(prefix, keep_features=True)[1] == 0
    assert evaluate.ImageStats.load_progress(prefix, keep_features=False)[1] == 9
    evaluate.ImageStats.remove_progress(prefix)
    assert not os.listdir(tmp_path / "partial")


def test_eval_resumes_after_preemption(trained_run, monkeypatch, tmp_path):
    """Also: IS with a user classifier, precision/recall and KID once the reference has
    features, and the explicit 'unavailable' while it has none."""
    from scipy import special
    from test_classifier import write_fake_pytorch_fid

    from cm_jax import generate

    config, workdir = trained_run
    config = config.copy_and_resolve_references()
    state = write_fake_pytorch_fid(tmp_path / "pt_inception.pth")
    config.eval.update(
        num_samples=20,
        chunk_size=8,  # Chunks of 8 + 8 + 4 samples.
        classifier_path=str(tmp_path / "pt_inception.pth"),
        ref_stats=str(tmp_path / "ref.npz"),
    )
    with np.load(workdir / "ref.npz") as f:  # The run's stand-in, without features.
        np.savez(tmp_path / "ref.npz", **f)
    config.sample.sigmas = (80.0, 0.821)
    features, extract = [], evaluate.FeatureExtractor.features

    def recording_features(self, images):
        pool3, spatial = extract(self, images)
        features.append(pool3)
        return pool3, spatial

    monkeypatch.setattr(evaluate.FeatureExtractor, "features", recording_features)
    reference = evaluate.run_eval(config, str(workdir))
    features = np.concatenate(features)  # The 20 samples' pool3 features.
    assert reference["precision_recall"] == reference["kid"] == evaluate.NO_REFERENCE_FEATURES
    probs = special.softmax(features.astype(np.float64) @ state["fc.weight"].T, axis=1)
    assert (reference["inception_score"], reference["inception_score_std"]) == pytest.approx(
        fid.inception_score(probs, 10), rel=1e-9
    )
    # Reference features: the first 5 samples' four times over, a hair apart (balls too small
    # to hold any other sample), and all that again far off.
    gaps = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    hair = gaps[gaps > 0].min() / 100 / np.sqrt(features.shape[1])
    near = np.concatenate([features[:5] + c * hair for c in range(4)])
    ref_features = np.concatenate([near, near + 100.0])
    np.save(evaluate.reference_features_path(config.eval.ref_stats), ref_features)
    monkeypatch.undo()

    calls, original = [], generate.Generator.sample

    def preempted_sample(self, num, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) == 2:
            raise KeyboardInterrupt("pre-empted")
        return original(self, num, **kwargs)

    monkeypatch.setattr(generate.Generator, "sample", preempted_sample)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(config, str(workdir))
    assert any(".features." in name for name in os.listdir(workdir / "eval" / "partial"))
    resumed = evaluate.run_eval(config, str(workdir))
    assert calls == [0, 8, 8, 16]  # The first chunk was not sampled again.
    assert resumed["fid"] == pytest.approx(reference["fid"], rel=1e-9)
    assert resumed["inception_score"] == pytest.approx(reference["inception_score"], rel=1e-9)
    precision, recall = fid.precision_recall(ref_features, features)
    kid = fid.kernel_inception_distance(ref_features, features)
    assert (resumed["precision"], resumed["recall"]) == (precision, recall)
    assert (precision, recall) == (5 / 20, 1 / 2)
    assert (resumed["kid"], resumed["kid_std"]) == pytest.approx(kid, rel=1e-9)
    assert not os.listdir(workdir / "eval" / "partial")


def test_tensorboard_holds_the_grids_the_config_and_the_fids(trained_run, caplog):
    """What a user opens TensorBoard for: the sample grid at sample_every, the config, the FID of
    the training hook, and --mode=eval's FID at the checkpoint's step; eval reports progress."""
    import logging

    pytest.importorskip("tensorflow")
    from tensorboard.backend.event_processing import event_accumulator as ea

    config, workdir = trained_run
    config = config.copy_and_resolve_references()
    config.eval.update(num_samples=4, chunk_size=4)
    caplog.set_level(logging.INFO)
    row = evaluate.run_eval(config, str(workdir))
    progress = [
        r.getMessage() for r in caplog.records if "eval: sampling + features" in r.getMessage()
    ]
    assert any("4/4 img (" in line and "img/s" in line for line in progress), progress
    acc = ea.EventAccumulator(str(workdir / "tensorboard"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    plugin = lambda tag: acc.SummaryMetadata(tag).plugin_data.plugin_name
    tags = set(acc.Tags()["tensors"])
    assert {"samples/ema_0.9", "config", "fid", "eval/fid"} <= tags, tags
    assert (plugin("samples/ema_0.9"), plugin("config"), plugin("eval/fid")) == (
        "images",
        "text",
        "scalars",
    )
    event = acc.Tensors("eval/fid")[-1]  # Other tests of this module evaluate the same run.
    assert event.step == row["step"] == 4
    from tensorboard.util import tensor_util

    assert float(tensor_util.make_ndarray(event.tensor_proto)) == pytest.approx(row["fid"])
