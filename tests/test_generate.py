"""Sampling and editing from a trained workdir through the Python API."""

import numpy as np
import pytest

from cm_jax import trainer
from cm_jax.generate import Generator
from configs import cifar10_ict


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_shards):
    workdir = str(tmp_path_factory.mktemp("ict_run"))
    config = cifar10_ict.get_config("test")
    config.data.dir = tiny_shards
    config.train.sample_every = 0
    trainer.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def generator(run_dir):
    return Generator(run_dir)


def test_samples_do_not_depend_on_batch_size_or_device_count(run_dir, generator):
    import jax

    a, labels = generator.sample(10, sigmas=(80.0, 0.821), batch_size=8, seed=3)
    assert a.shape == (10, 16, 16, 3) and a.dtype == np.uint8 and labels is None
    b, _ = generator.sample(10, sigmas=(80.0, 0.821), batch_size=16, seed=3)
    one_device = Generator(run_dir, devices=jax.devices()[:1])
    c, _ = one_device.sample(10, sigmas=(80.0, 0.821), batch_size=3, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    d, _ = generator.sample(10, sigmas=(80.0, 0.821), batch_size=8, seed=4)
    assert not np.array_equal(a, d)


def test_official_ts_equal_their_sigmas(generator):
    sigmas = generator.time_points(ts=(0, 22, 39), num_scales=40)
    a, _ = generator.sample(8, ts=(0, 22, 39), num_scales=40)
    b, _ = generator.sample(8, sigmas=tuple(float(s) for s in sigmas))
    np.testing.assert_array_equal(a, b)


def test_bad_requests_are_clear_errors(generator, run_dir):
    with pytest.raises(ValueError, match="decreasing"):
        generator.sample(4, sigmas=(1.0, 2.0))
    with pytest.raises(ValueError, match="num_scales"):
        generator.sample(4, ts=(0, 5))
    with pytest.raises(ValueError, match="unconditional"):
        generator.sample(4, labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[B, 16, 16, 3\]"):
        generator.edit("colorization", np.zeros((2, 8, 8, 3), np.uint8), sigmas=(80.0,))
    with pytest.raises(ValueError, match="Unknown editing task"):
        generator.edit("sharpen", np.zeros((2, 16, 16, 3), np.uint8), sigmas=(80.0,))
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
        Generator(run_dir, step=3)


def test_inpainting_keeps_the_known_pixels(generator):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = generator.edit("inpainting", images, sigmas=(80.0, 5.0, 0.5), mask="center")
    assert out.shape == images.shape
    from cm_jax import editing

    known = editing.center_square_mask(16).astype(bool)  # [H, W], True = known
    np.testing.assert_array_equal(out[:, known], images[:, known])
    assert not np.array_equal(out, images)


def test_sample_and_edit_modes_write_npz_and_grids(run_dir, tmp_path):
    from cm_jax import generate

    config = cifar10_ict.get_config("test")
    config.sample.update(num_samples=5, sigmas=(80.0, 0.821), out_dir=str(tmp_path / "s"))
    npz, png = generate.run_sample(config, run_dir)
    assert npz.endswith("samples_5x16x16x3.npz") and np.load(npz)["arr_0"].shape == (5, 16, 16, 3)
    assert png.endswith(".png")

    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", images=images)
    config.edit.update(
        task="superres", images=str(tmp_path / "in.npz"), factor=2, out_dir=str(tmp_path / "e")
    )
    npz, _ = generate.run_edit(config, run_dir)
    result = np.load(npz)["arr_0"].astype(np.float64)
    patches = lambda x: x.reshape(2, 8, 2, 8, 2, 3)
    means = lambda x: patches(x).mean(axis=(2, 4))
    # Patch means survive exactly up to the uint8 rounding of each pixel, where no pixel of the
    # result had to be clipped to [0, 255].
    unclipped = ((patches(result) > 0) & (patches(result) < 255)).all(axis=(2, 4))
    assert unclipped.mean() > 0.5
    error = np.abs(means(result) - means(images.astype(np.float64)))
    assert error[unclipped].max() <= 0.5
    config.edit.images = str(tmp_path / "missing.npz")
    with pytest.raises(Exception, match="missing.npz"):
        generate.run_edit(config, run_dir)


def test_class_conditional_run_trains_samples_and_records_its_labels(tiny_shards, tmp_path):
    # The shards' labels feed the label embedding in training; sampling takes labels or draws
    # them per sample index, and --mode=sample stores them as arr_1 beside the images.
    from cm_jax import generate

    config = cifar10_ict.get_config("test")
    config.data.dir = tiny_shards
    config.model.update(num_classes=10, init_scale=1.0)  # A nonzero output layer at init.
    config.train.update(num_steps=2, sample_every=0)
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    gen = Generator(str(tmp_path / "run"))
    zeros, labels = gen.sample(4, labels=[0, 0, 0, 0], batch_size=8)
    sevens, _ = gen.sample(4, labels=[7, 7, 7, 7], batch_size=8)
    assert labels.tolist() == [0, 0, 0, 0] and not np.array_equal(zeros, sevens)
    _, drawn = gen.sample(6, seed=2, batch_size=8)
    _, later = gen.sample(3, seed=2, batch_size=8, first_index=3)
    assert drawn.min() >= 0 and drawn.max() < 10 and later.tolist() == drawn[3:].tolist()
    with pytest.raises(ValueError, match=r"labels must be 4 ints in \[0, 10\)"):
        gen.sample(4, labels=[0, 1, 2, 10])

    config.sample.update(num_samples=6, seed=2, batch_size=8, out_dir=str(tmp_path / "s"))
    npz, _ = generate.run_sample(config, str(tmp_path / "run"))
    with np.load(npz) as f:
        assert f["arr_1"].tolist() == drawn.tolist() and f["arr_0"].shape == (6, 16, 16, 3)
