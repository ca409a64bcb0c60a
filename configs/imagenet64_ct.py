"""Consistency training (CT) on ImageNet 64 (CM paper, one-step FID 13.0), as
openai/consistency_models runs it (`cm_train.py --training_mode consistency_training`): the
class-conditional ADM, the original curriculum with s0 = 2, s1 = 200 and μ0 = 0.95 (μ(k) by the
official formula), uniform weighting, LPIPS on images resized to 224, dropout 0, batch 2048,
RAdam 1e-4, 800k steps, evaluation EMAs 0.999, 0.9999 and 0.9999432. Two-step sampling uses the
official `ts` 0,106,200 on the 201-point grid (`--config.sample.ts="(0,106,200)"`).

The official launch script also passes the EDM teacher to CT runs, and `cm_train.py` then
copies its weights into the student (openai/consistency_models issue #53); the paper describes
CT from scratch, which is what this config does.

Variants: paper (default), `:cpu` (a tiny ADM on the local CIFAR-10 and its labels, l2) and
`:test`.
"""

from configs import common


def get_config(variant=None):
    c = common.imagenet64_config("ct")
    c.loss.update(
        distance="l2" if variant else "lpips", weighting="uniform", index_sampling="uniform"
    )
    c.schedule.update(kind="ct", s0=2, s1=200, mu0=0.95, mu_formula="official")
    c.optim.update(name="radam", lr=1e-4, warmup_steps=0, grad_clip=0.0)
    c.train.update(batch_size=2048, num_steps=800_000)
    c.sample.num_scales = c.search.num_scales = 201
    common.apply_small_adm_variant(c, variant, "imagenet64_ct")
    return c
