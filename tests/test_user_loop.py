"""The user's loop through launch.py: a trained run is its own default (no --config needed to
sample, and the run's sampler and steps are followed), --help lists the configs, and the
mistakes a user makes on the command line are one short line."""

import os
import subprocess
import sys

import numpy as np
import pytest
from subprocess_env import xla_flags

from cm_jax import trainer
from cm_jax.generate import Generator
from configs import cifar10_ict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*flags, timeout=600):
    return subprocess.run(
        [sys.executable, "launch.py", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, XLA_FLAGS=xla_flags(2)),
    )


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, tiny_shards):
    """A 4-step iCT run whose config asks for the recipe's two steps by default."""
    workdir = tmp_path_factory.mktemp("run")
    config = cifar10_ict.get_config("test")
    config.data.dir = tiny_shards
    config.train.sample_every = 0
    config.sample.steps = 2
    trainer.train_and_evaluate(config, str(workdir))
    return workdir


def test_a_generator_samples_as_its_run_says(two_step_run):
    gen = Generator(str(two_step_run))
    default, _ = gen.sample(4, batch_size=8)
    two_step, _ = gen.sample(4, sigmas=(80.0, 0.821), batch_size=8)
    one_step, _ = gen.sample(4, steps=1, batch_size=8)
    np.testing.assert_array_equal(default, two_step)
    assert not np.array_equal(default, one_step)
    assert gen.sampler().sigmas == pytest.approx((80.0, 0.821))


def test_sample_mode_needs_no_config_and_gives_the_same_images(two_step_run, tmp_path):
    common = [f"--workdir={two_step_run}", "--mode=sample", "--config.sample.num_samples=6"]
    bare = _launch(*common, f"--config.sample.out_dir={tmp_path / 'bare'}")
    assert bare.returncode == 0, bare.stderr[-3000:]
    with_file = _launch(  # ml_collections wants --config before the --config.x flags.
        "--config=configs/cifar10_ict.py:test",
        *common,
        "--config.sample.steps=2",
        f"--config.sample.out_dir={tmp_path / 'file'}",
    )
    assert with_file.returncode == 0, with_file.stderr[-3000:]
    name = "samples_6x16x16x3.npz"
    images = np.load(tmp_path / "bare" / name)["arr_0"]
    np.testing.assert_array_equal(np.load(tmp_path / "file" / name)["arr_0"], images)
    assert "sampling: 6/6 img (" in bare.stderr and "img/s" in bare.stderr


def test_an_unknown_config_field_is_one_line(tmp_path):
    result = _launch(
        "--config=configs/cifar10_ict.py:test",
        f"--workdir={tmp_path}",
        "--config.train.batchsize=8",
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "launch.py: --config.train.batchsize: the config has no field 'batchsize'. "
        'Did you mean "batch_size" instead of "batchsize"?'
    ], result.stderr[-2000:]
    assert not os.listdir(tmp_path)


def test_training_needs_a_config_and_help_lists_them(tmp_path):
    result = _launch(f"--workdir={tmp_path}", timeout=120)
    assert result.returncode != 0 and "--mode=train needs --config" in result.stderr
    help_text = _launch("--help", timeout=120).stdout
    assert "imagenet64_ct.py" in help_text and "variants: :scratch, :cpu, :test" in help_text
    assert "--config=configs/cifar10_ict.py:cpu --workdir=workdirs/ict_cpu \\\n" in help_text
