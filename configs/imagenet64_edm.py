"""ImageNet-64 EDM diffusion teacher (class-conditional ADM, 296M parameters).

The EDM diffusion teacher on ImageNet 64, as openai/consistency_models trains it
(`edm_train.py` in `scripts/launch.sh`): the class-conditional ADM (`common.adm_imagenet64`)
with dropout 0.1, batch 4096, RAdam 1e-4 at a constant rate, lognormal σ (P_mean −1.2,
P_std 1.2) with the EDM weighting, evaluation EMAs 0.999, 0.9999 and 0.9999432. The original
runs in fp16; `--config.model.dtype=bfloat16` is the mixed precision here. The launch script
sets no step limit: 600k steps of 4096 is EDM's ImageNet-64 budget of about 2.5B images. Sample
grids use Heun with 40 steps (79 evaluations), the CM paper's EDM baseline.

    python launch.py --config=configs/imagenet64_edm.py --workdir=workdirs/edm64 \\
        --config.data.dir=/data/imagenet64

Variants: paper (default), `:cpu` (a tiny ADM on the local CIFAR-10 and its labels), `:test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    c = common.imagenet64_config("edm")
    c.train.batch_size = 4096
    common.apply_small_adm_variant(c, variant, "imagenet64_edm")
    return common.apply_adm_teacher_recipe(c, variant)
