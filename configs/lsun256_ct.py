"""Consistency training (CT) on LSUN 256 bedroom or cat, as openai/consistency_models runs it
(`cm_train.py --training_mode consistency_training`): the unconditional ADM
(`common.adm_lsun256`), the original curriculum with s0 = 2, s1 = 150 and μ0 = 0.95 (μ(k) by the
official formula), uniform weighting, LPIPS, dropout 0, batch 256, RAdam 5e-5, 1M steps,
evaluation EMAs 0.9999, 0.99994 and 0.9999432. As for ImageNet 64, the launch script also
passes the EDM teacher, whose weights `cm_train.py` then copies into the student
(openai/consistency_models issue #53); the paper describes CT from scratch, which this config does.

Variants: `bedroom` (default), `cat`, `cpu` (a tiny unconditional ADM on the local CIFAR-10, l2)
and `test`.
"""

from configs import common


def get_config(variant=None):
    category, _, small = common.split_lsun_variant(variant, "lsun256_ct")
    c = common.lsun256_config("ct", category)
    c.loss.update(
        distance="l2" if small else "lpips", weighting="uniform", index_sampling="uniform"
    )
    c.schedule.update(kind="ct", s0=2, s1=150, mu0=0.95, mu_formula="official")
    c.optim.update(name="radam", lr=5e-5, warmup_steps=0, grad_clip=0.0)
    c.train.num_steps = 1_000_000
    c.sample.num_scales = c.search.num_scales = 151
    common.apply_small_lsun_variant(c, small, "lsun256_ct")
    return c
