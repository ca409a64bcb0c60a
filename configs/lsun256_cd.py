"""LSUN-256 bedroom or cat consistency distillation (CD).

Consistency distillation (CD) on LSUN 256 bedroom or cat, as openai/consistency_models runs it
(`cm_train.py --training_mode consistency_distillation` in `scripts/launch.sh`): the
unconditional ADM (`common.adm_lsun256`) started from its EDM teacher
(`configs/lsun256_edm.py`), N = 40 fixed, the target EMA μ = 0.95 fixed, Heun teacher steps,
uniform weighting, LPIPS (images of 256 and more are not resized), student dropout 0, batch
256, RAdam 1e-5 (no warm-up, no clipping), 600k steps, evaluation EMAs 0.9999, 0.99994 and
0.9999432.

    python launch.py --config=configs/lsun256_cd.py:bedroom --workdir=workdirs/cd_bedroom \\
        --config.data.dir=/data/lsun_bedroom256 --config.teacher.workdir=workdirs/edm_bedroom \\
        --config.loss.lpips_vgg_path=lpips_vgg16.npz

Variants: `bedroom` (default) and `cat` with LPIPS, `bedroom_l2` and `cat_l2` (the released
CD-l2 models), `cpu` (a tiny unconditional ADM distilled from an `lsun256_edm.py:cpu` teacher on
the local CIFAR-10, l2) and `test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("bedroom", "cat", "bedroom_l2", "cat_l2", "cpu", "test")


def get_config(variant=None):
    category, metric, small = common.split_lsun_variant(variant, "lsun256_cd", ("", "l2"))
    c = common.lsun256_config("cd", category)
    c.loss.update(
        distance="l2" if (metric or small) else "lpips",
        weighting="uniform",
        index_sampling="uniform",
    )
    c.schedule.update(kind="fixed", num_scales=40, target_ema=0.95)
    c.optim.update(name="radam", lr=1e-5, warmup_steps=0, grad_clip=0.0)
    c.train.num_steps = 600_000
    c.teacher.update(solver="heun", init_student=True)
    # scripts/launch.sh:83,86: bedroom ts (0,17,39) with LPIPS, (0,18,39) with l2; no cat line.
    two_step_ts = {("bedroom", ""): (0, 17, 39), ("bedroom", "l2"): (0, 18, 39)}
    c.sample.update(two_step_ts=two_step_ts.get((category, metric), ()), num_scales=40)
    c.search.num_scales = 40
    common.apply_small_lsun_variant(c, small, "lsun256_cd")
    if variant == "cpu":
        c.optim.lr = 2e-4  # A tiny model in 300 steps; 1e-5 is for 600k steps of 256.
    return c
