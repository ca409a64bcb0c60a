"""ImageNet-64 consistency training (CT), the CM paper's one-step FID 13.0.

Consistency training (CT) on ImageNet 64 (CM paper, one-step FID 13.0), as
openai/consistency_models runs it (`cm_train.py --training_mode consistency_training`): the
class-conditional ADM, the original curriculum with s0 = 2, s1 = 200 and μ0 = 0.95 (μ(k) by the
official formula), uniform weighting, LPIPS (piq's, average pools) on images resized to 224,
dropout 0, batch 2048, RAdam 1e-4, 800k steps, evaluation EMAs 0.999, 0.9999 and 0.9999432.
Two-step sampling (`--config.sample.steps=2`) uses the official `ts` 0,106,200 on the 201-point
grid.

The student starts from the EDM teacher's weights, as the official runs did and so the
released `ct_imagenet64.pt` was trained: `scripts/launch.sh` passes `--teacher_model_path` to
the CT run too, and `cm_train.py` copies the teacher into the student for every training mode
(openai/consistency_models issue #53); the CT loss never calls the teacher. Give it with
--config.teacher.workdir (an `imagenet64_edm.py` run or an imported `edm_imagenet64_ema.pt`).
`:scratch` trains from random weights, as the paper describes CT.

    python launch.py --config=configs/imagenet64_ct.py --workdir=workdirs/ct64 \\
        --config.data.dir=/data/imagenet64 --config.teacher.workdir=workdirs/edm64 \\
        --config.loss.lpips_vgg_path=lpips_vgg16.npz

Variants: paper (default), `:scratch`, `:cpu` (a tiny ADM on the local CIFAR-10 and its labels,
l2, from scratch) and `:test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("scratch", "cpu", "test")


def get_config(variant=None):
    small = variant if variant in ("cpu", "test") else None
    if variant not in (None, "scratch", "cpu", "test"):
        raise ValueError(f"Unknown variant {variant!r} of imagenet64_ct: use scratch, cpu or test.")
    c = common.imagenet64_config("ct")
    c.loss.update(
        distance="l2" if small else "lpips", weighting="uniform", index_sampling="uniform"
    )
    c.schedule.update(kind="ct", s0=2, s1=200, mu0=0.95, mu_formula="official")
    c.optim.update(name="radam", lr=1e-4, warmup_steps=0, grad_clip=0.0)
    c.train.update(batch_size=2048, num_steps=800_000)
    c.teacher.init_student = variant is None  # The small variants have no teacher to start from.
    c.sample.update(two_step_ts=(0, 106, 200), num_scales=201)  # scripts/launch.sh:80
    c.search.num_scales = 201
    common.apply_small_adm_variant(c, small, "imagenet64_ct")
    return c
