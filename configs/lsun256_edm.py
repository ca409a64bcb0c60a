"""LSUN-256 bedroom or cat EDM diffusion teacher (unconditional ADM).

The EDM diffusion teacher on LSUN 256 bedroom or cat (openai/consistency_models releases
`edm_bedroom256_ema.pt` and `edm_cat256_ema.pt`; import them with `cm_jax.import_openai`): the
unconditional ADM (`common.adm_lsun256`) with dropout 0.1 (the LSUN teachers'), batch 256 and
the evaluation EMAs 0.999, 0.9999 and 0.9999432 (scripts/launch.sh:7; the LSUN CD and CT runs
use 0.9999, 0.99994 and 0.9999432).
The rest is the ImageNet-64 teacher's recipe (`configs/imagenet64_edm.py`: RAdam 1e-4 at a
constant rate, lognormal σ with P_mean −1.2 and P_std 1.2, the EDM weighting), not checked
against the LSUN launch line. Sample grids use Heun with 40 steps.

Variants: `bedroom` (default), `cat`, `cpu` (a tiny unconditional ADM on the local CIFAR-10)
and `test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("bedroom", "cat", "cpu", "test")


def get_config(variant=None):
    category, _, small = common.split_lsun_variant(variant, "lsun256_edm")
    c = common.lsun256_config("edm", category)
    c.train.ema_rates = common.IMAGENET64_EMA_RATES  # scripts/launch.sh:7
    common.apply_small_lsun_variant(c, small, "lsun256_edm")
    return common.apply_adm_teacher_recipe(c, small)
