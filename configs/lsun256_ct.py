"""LSUN-256 bedroom or cat consistency training (CT).

Consistency training (CT) on LSUN 256 bedroom or cat, as openai/consistency_models runs it
(`cm_train.py --training_mode consistency_training`): the unconditional ADM
(`common.adm_lsun256`), the original curriculum with s0 = 2, s1 = 150 and μ0 = 0.95 (μ(k) by the
official formula), uniform weighting, LPIPS, dropout 0, batch 256, RAdam 5e-5, 1M steps,
evaluation EMAs 0.9999, 0.99994 and 0.9999432. As for ImageNet 64 (`imagenet64_ct.py`), the
student starts from the EDM teacher's weights (--config.teacher.workdir), as the official runs
and the released `ct_bedroom256.pt` / `ct_cat256.pt`; `_scratch` trains from random weights, as
the paper describes CT. Two-step sampling (`--config.sample.steps=2`): the official `ts`
0,67,150 (bedroom) or 0,62,150 (cat) on the 151-point grid.

Variants: `bedroom` (default), `cat`, `bedroom_scratch`, `cat_scratch`, `cpu` (a tiny
unconditional ADM on the local CIFAR-10, l2, from scratch) and `test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("bedroom", "cat", "bedroom_scratch", "cat_scratch", "cpu", "test")


def get_config(variant=None):
    category, start, small = common.split_lsun_variant(variant, "lsun256_ct", ("", "scratch"))
    c = common.lsun256_config("ct", category)
    c.loss.update(
        distance="l2" if small else "lpips", weighting="uniform", index_sampling="uniform"
    )
    c.schedule.update(kind="ct", s0=2, s1=150, mu0=0.95, mu_formula="official")
    c.optim.update(name="radam", lr=5e-5, warmup_steps=0, grad_clip=0.0)
    c.train.num_steps = 1_000_000
    c.teacher.init_student = not (start or small)  # The small variants have no teacher.
    two_step_ts = {"bedroom": (0, 67, 150), "cat": (0, 62, 150)}  # scripts/launch.sh:89,92
    c.sample.update(two_step_ts=two_step_ts[category], num_scales=151)
    c.search.num_scales = 151
    common.apply_small_lsun_variant(c, small, "lsun256_ct")
    return c
