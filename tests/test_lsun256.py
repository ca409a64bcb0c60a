"""The LSUN-256 recipes (openai/consistency_models `scripts/launch.sh`) on the unconditional ADM:
their values, and an imported release-format teacher that samples and starts CD, at toy size
and without classes or scale-shift norm."""

import numpy as np
import pytest
from guided_diffusion_keys import openai_state_dict, random_arrays
from test_imagenet64 import parameter_count

from cm_jax import import_openai, models, train_state, trainer
from cm_jax.generate import Generator
from configs import lsun256_cd, lsun256_ct, lsun256_edm

EMAS = (0.9999, 0.99994, 0.9999432189950708)
IN64_EMAS = (0.999, 0.9999, 0.9999432189950708)


def test_the_official_recipes():
    edm, cd, ct = lsun256_edm.get_config(), lsun256_cd.get_config(), lsun256_ct.get_config()
    for c in (edm, cd, ct):
        assert (c.model.name, c.model.model_channels, c.model.num_res_blocks) == ("adm", 256, 2)
        assert tuple(c.model.ch_mult) == (1, 1, 2, 2, 4, 4)
        assert (c.model.num_classes, c.model.use_scale_shift_norm) == (0, False)
        assert (c.data.image_size, c.data.dataset, c.train.batch_size) == (256, "lsun/bedroom", 256)
        # The teacher's are the ImageNet-64 ones (scripts/launch.sh:7), the students' LSUN's.
        assert tuple(c.train.ema_rates) == (IN64_EMAS if c is edm else EMAS)
        assert c.optim.name == "radam"
    assert (edm.method, edm.model.dropout) == ("edm", 0.1)
    assert (cd.method, cd.optim.lr, cd.train.num_steps, cd.model.dropout) == (
        "cd",
        1e-5,
        600_000,
        0.0,
    )
    assert (cd.schedule.kind, cd.schedule.num_scales, cd.schedule.target_ema) == ("fixed", 40, 0.95)
    assert cd.loss.distance == "lpips" and lsun256_cd.get_config("cat_l2").loss.distance == "l2"
    assert lsun256_cd.get_config("cat_l2").data.dataset == "lsun/cat"
    assert (ct.method, ct.optim.lr, ct.train.num_steps) == ("ct", 5e-5, 1_000_000)
    assert (ct.schedule.s0, ct.schedule.s1, ct.schedule.mu0) == (2, 150, 0.95)
    for module, bad in ((lsun256_cd, "church"), (lsun256_cd, "bedroom_l1"), (lsun256_ct, "dog")):
        with pytest.raises(ValueError, match=f"Unknown variant '{bad}'"):
            module.get_config(bad)


@pytest.mark.parametrize("module", [lsun256_edm, lsun256_cd, lsun256_ct])
def test_small_variants_are_small_and_unconditional(module):
    for variant in ("cpu", "test"):
        config = module.get_config(variant)
        assert parameter_count(config) < 1_000_000
        assert (config.model.num_classes, config.model.use_scale_shift_norm) == (0, False)


def test_an_imported_release_teacher_samples_and_starts_cd(tmp_path):
    """The released LSUN teachers are PyTorch files: one in that format (an npz of the state
    dict, so no torch is needed) becomes a run that samples with Heun, and that CD loads as its
    frozen teacher and starting point. (CD's step on ADM trains in test_imagenet64.)"""
    teacher = lsun256_edm.get_config("test")
    state_dict = openai_state_dict(teacher.model, 16, random_arrays(0))
    np.savez(tmp_path / "edm_test256_ema.npz", **state_dict)
    import_openai.import_checkpoint(
        str(tmp_path / "edm_test256_ema.npz"), teacher, str(tmp_path / "edm")
    )
    images, labels = Generator(str(tmp_path / "edm")).sample(2, batch_size=2)
    assert images.shape == (2, 16, 16, 3) and labels is None

    config = lsun256_cd.get_config("test")
    config.teacher.workdir = str(tmp_path / "edm")
    mesh = train_state.create_mesh()
    _, frozen = trainer.load_frozen_networks(config, mesh)
    start = trainer.initial_student(config, models.create_model(config.model), frozen)
    kernel = np.asarray(start["input_blocks_0_0"]["kernel"])
    np.testing.assert_array_equal(
        kernel, state_dict["input_blocks.0.0.weight"].transpose(2, 3, 1, 0)
    )
