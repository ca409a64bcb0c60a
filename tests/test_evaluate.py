"""--mode=stats and --mode=eval on real CIFAR-10 images (a handful: the network is slow on CPU)."""
import json

import numpy as np
import pytest

from cm_jax.evaluation import evaluate, fid
from configs import cifar10_ict

N = 12


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
