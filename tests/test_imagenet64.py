"""The ImageNet-64 recipes (openai/consistency_models `scripts/launch.sh`) on the ADM network:
their values, the network's size, and teacher → CD → class-conditional samples at toy size."""

import json

import jax
import numpy as np
import pytest

from cm_jax import models, train_state, trainer
from cm_jax.generate import Generator
from configs import imagenet64_cd, imagenet64_ct, imagenet64_edm

EMAS = (0.999, 0.9999, 0.9999432189950708)


def test_the_official_recipes():
    edm, cd, ct = (
        imagenet64_edm.get_config(),
        imagenet64_cd.get_config(),
        imagenet64_ct.get_config(),
    )
    for c in (edm, cd, ct):
        assert (c.model.name, c.model.num_classes, c.data.image_size) == ("adm", 1000, 64)
        assert tuple(c.train.ema_rates) == EMAS and c.optim.name == "radam"
    assert (edm.method, edm.train.batch_size, edm.optim.lr, edm.model.dropout) == (
        "edm",
        4096,
        1e-4,
        0.1,
    )
    assert (cd.method, cd.train.batch_size, cd.optim.lr, cd.train.num_steps) == (
        "cd",
        2048,
        8e-6,
        600_000,
    )
    assert (cd.schedule.kind, cd.schedule.num_scales, cd.schedule.target_ema) == ("fixed", 40, 0.95)
    assert (cd.loss.distance, cd.loss.weighting, cd.model.dropout) == ("lpips", "uniform", 0.0)
    assert imagenet64_cd.get_config("l2").loss.distance == "l2"
    assert (ct.method, ct.train.batch_size, ct.optim.lr, ct.train.num_steps) == (
        "ct",
        2048,
        1e-4,
        800_000,
    )
    assert (ct.schedule.kind, ct.schedule.s0, ct.schedule.s1, ct.schedule.mu0) == (
        "ct",
        2,
        200,
        0.95,
    )
    with pytest.raises(ValueError, match="Unknown variant 'tpu' of imagenet64_ct"):
        imagenet64_ct.get_config("tpu")


def parameter_count(config):
    """The parameters of config's network at its image size, computing nothing."""
    net = models.create_model(config.model)
    shapes = jax.eval_shape(lambda: train_state.init_params(config, net, jax.random.PRNGKey(0)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def test_the_paper_network_has_296m_parameters():
    assert parameter_count(imagenet64_cd.get_config()) == 295_899_267  # EDM quotes 295.9M.


@pytest.mark.parametrize("module", [imagenet64_edm, imagenet64_cd, imagenet64_ct])
def test_small_variants_fit_their_images(module):
    for variant in ("cpu", "test"):
        assert parameter_count(module.get_config(variant)) < 1_000_000


def test_teacher_then_cd_then_class_conditional_samples(tiny_shards, tmp_path):
    teacher = imagenet64_edm.get_config("test")
    teacher.data.dir = tiny_shards
    teacher.train.sample_every = 0  # Grids are tested elsewhere; here they would only compile.
    trainer.train_and_evaluate(teacher, str(tmp_path / "edm"))

    config = imagenet64_cd.get_config("test")
    config.data.dir = tiny_shards
    config.teacher.workdir = str(tmp_path / "edm")
    config.train.sample_every = 0
    trainer.train_and_evaluate(config, str(tmp_path / "cd"))
    rows = [json.loads(line) for line in open(tmp_path / "cd" / "metrics.jsonl")]
    assert rows[-1]["step"] == 4 and rows[-1]["num_scales"] == 40
    assert rows[-1]["target_ema"] == pytest.approx(0.95)
    assert np.isfinite(rows[-1]["loss"])

    gen = Generator(str(tmp_path / "cd"))
    labels = np.asarray([0, 7, 3], np.int32)
    images, got = gen.sample(3, ts=(0, 22, 39), num_scales=40, labels=labels, batch_size=8)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(got, labels)
