"""ImageNet-64 consistency distillation (CD), the CM paper's one-step FID 6.20.

Consistency distillation (CD) on ImageNet 64, the CM paper's headline one-step FID 6.20
(LPIPS), as openai/consistency_models runs it (`cm_train.py --training_mode
consistency_distillation` in `scripts/launch.sh`): the class-conditional ADM started from
its EDM teacher (`configs/imagenet64_edm.py`), N = 40 fixed, the target EMA μ = 0.95 fixed
(CIFAR-10 uses 0), Heun teacher steps, uniform weighting, LPIPS on images resized to 224,
student dropout 0, batch 2048, RAdam 8e-6 (no warm-up, no clipping), 600k steps, evaluation
EMAs 0.999, 0.9999 and 0.9999432. LPIPS is piq's (average pools), as the official code's.
Two-step sampling (`--mode=sample --config.sample.steps=2`) uses the official `ts` 0,22,39 on
the 40-point grid.

    python launch.py --config=configs/imagenet64_cd.py --workdir=workdirs/cd64 \\
        --config.data.dir=/data/imagenet64 --config.teacher.workdir=workdirs/edm64 \\
        --config.loss.lpips_vgg_path=lpips_vgg16.npz

Variants: paper LPIPS (default), `:l2` (the paper's CD-l2), `:cpu` (a tiny ADM distilled
from an `imagenet64_edm.py:cpu` teacher on the local CIFAR-10) and `:test`; the small variants
use l2.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("l2", "cpu", "test")


def get_config(variant=None):
    c = common.imagenet64_config("cd")
    c.loss.update(
        distance="l2" if variant else "lpips", weighting="uniform", index_sampling="uniform"
    )
    c.schedule.update(kind="fixed", num_scales=40, target_ema=0.95)
    c.optim.update(name="radam", lr=8e-6, warmup_steps=0, grad_clip=0.0)
    c.train.update(batch_size=2048, num_steps=600_000)
    c.teacher.update(solver="heun", init_student=True)
    c.sample.update(two_step_ts=(0, 22, 39), num_scales=40)  # scripts/launch.sh:74,77
    c.search.num_scales = 40
    if variant != "l2":
        common.apply_small_adm_variant(c, variant, "imagenet64_cd")
    if variant == "cpu":
        c.optim.lr = 2e-4  # A tiny model in 600 steps; 8e-6 is for 600k steps of 2048.
    return c
