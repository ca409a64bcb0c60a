"""--mode=stats and --mode=eval on real CIFAR-10 images (a handful: the network is slow on CPU)."""
import json
import os

import numpy as np
import pytest

from cm_jax.evaluation import evaluate, fid
from configs import cifar10_ict

N = 8


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory, cifar10_dir):
    """Two tiny 'train' shards of real CIFAR-10 test images and an npz of other ones."""
    images = np.load(f"{cifar10_dir}/test.npz")["images"]
    folder = tmp_path_factory.mktemp("cifar")
    for k in range(2):
        np.savez(folder / f"train-{k:05d}-of-00002.npz", images=images[k * N // 2:(k + 1) * N // 2],
                 labels=np.zeros(N // 2, np.int64))
    np.savez(folder / "samples.npz", arr_0=images[N:2 * N])
    return folder


def _config(folder, npz):
    config = cifar10_ict.get_config()
    config.data.dir = str(folder)
    config.eval.update(inception_path=npz, batch_size=8, ref_stats_out=str(folder / "ref.npz"))
    return config


def test_stats_then_eval_of_an_npz(cifar_shards, inception_weights, tmp_path, cifar10_dir):
    _, npz = inception_weights
    config = _config(cifar_shards, npz)
    path = evaluate.run_stats(config, str(tmp_path))
    with np.load(path) as f:
        assert int(f["n"]) == N and f["mu"].shape == (2048,) and f["sigma_spatial"].shape == (2023, 2023)
        assert str(f["meta_resize"]) == evaluate.RESIZE_CONVENTION
    config.eval.update(ref_stats=path, samples_npz=str(cifar_shards / "samples.npz"))
    row = evaluate.run_eval(config, str(tmp_path))
    # The same computation by hand from the features.
    extractor = evaluate.FeatureExtractor(evaluate.create_mesh(), npz, 8)
    ref = extractor.features(np.load(f"{cifar10_dir}/test.npz")["images"][:N])[0]
    ours = extractor.features(np.load(cifar_shards / "samples.npz")["arr_0"])[0]
    expected = fid.frechet_distance(ours.mean(0), np.cov(ours, rowvar=False),
                                    ref.mean(0), np.cov(ref, rowvar=False))
    assert row["fid"] == pytest.approx(expected, rel=1e-6)
    assert row["fid"] > 0 and "sfid" in row and row["num_samples"] == N
    logged = [json.loads(line) for line in open(tmp_path / "eval" / "metrics.jsonl")]
    assert logged[-1]["fid"] == row["fid"]


def test_missing_reference_is_a_clear_error(cifar_shards, tmp_path):
    config = _config(cifar_shards, "")
    config.eval.ref_stats = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="--mode=stats"):
        evaluate.run_eval(config, str(tmp_path))


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
    config.train.update(fid_every=2, fid_num_samples=4, sample_every=0)
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
    best, value, values = evaluate.ternary_search(lambda x: calls.append(x) or (x - 13) ** 2,
                                                  1, 38, integer=True)
    assert best == 13 and value == 0 and len(calls) == len(set(calls)) < 38
    best, value, _ = evaluate.ternary_search(lambda u: (u - 0.3) ** 2 + 1.0, -3.0, 3.0,
                                             integer=False, iterations=30)
    assert best == pytest.approx(0.3, abs=1e-3) and value == pytest.approx(1.0, abs=1e-5)


def test_search_mode_records_every_point_and_the_best(trained_run):
    config, workdir = trained_run
    config = config.copy_and_resolve_references()
    config.search.update(kind="index", num_scales=6, num_samples=4)
    sigmas, value = evaluate.run_search(config, str(workdir))
    rows = [json.loads(line) for line in open(workdir / "eval" / "search.jsonl")]
    points = {row["x"]: row["fid"] for row in rows if "best" not in row}
    assert set(points) <= {1.0, 2.0, 3.0, 4.0} and len(points) >= 3
    assert rows[-1]["fid"] == min(points.values()) == value and len(sigmas) == 2


def test_eval_resumes_after_preemption(trained_run, monkeypatch):
    from cm_jax import generate
    config, workdir = trained_run
    config = config.copy_and_resolve_references()
    config.eval.update(num_samples=20, chunk_size=8)   # Chunks of 8 + 8 + 4 samples.
    config.sample.sigmas = (80.0, 0.821)
    reference = evaluate.run_eval(config, str(workdir))

    calls, original = [], generate.Generator.sample

    def preempted_sample(self, num, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) == 2:
            raise KeyboardInterrupt("pre-empted")
        return original(self, num, **kwargs)

    monkeypatch.setattr(generate.Generator, "sample", preempted_sample)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_eval(config, str(workdir))
    resumed = evaluate.run_eval(config, str(workdir))
    assert calls == [0, 8, 8, 16]              # The first chunk was not sampled again.
    assert resumed["fid"] == pytest.approx(reference["fid"], rel=1e-9)
    assert not os.listdir(workdir / "eval" / "partial")
