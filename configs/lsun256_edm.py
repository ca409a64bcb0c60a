"""The EDM diffusion teacher on LSUN 256 bedroom or cat (openai/consistency_models releases
`edm_bedroom256_ema.pt` and `edm_cat256_ema.pt`; import them with `cm_jax.import_openai`): the
unconditional ADM (`common.adm_lsun256`) with dropout 0.1 (the LSUN teachers'), batch 256 and
the evaluation EMAs 0.9999, 0.99994 and 0.9999432 of the LSUN CD and CT runs.
The rest is the ImageNet-64 teacher's recipe (`configs/imagenet64_edm.py`: RAdam 1e-4 at a
constant rate, lognormal σ with P_mean −1.2 and P_std 1.2, the EDM weighting), not checked
against the LSUN launch line. Sample grids use Heun with 40 steps.

Variants: `bedroom` (default), `cat`, `cpu` (a tiny unconditional ADM on the local CIFAR-10)
and `test`.
"""
from configs import common


def get_config(variant=None):
    small = variant in ("cpu", "test")
    category = "bedroom" if small or variant is None else variant
    if category not in ("bedroom", "cat"):
        raise ValueError(f"Unknown variant {variant!r} of lsun256_edm: use bedroom, cat, cpu "
                         "or test.")
    c = common.lsun256_config("edm", category)
    c.model.dropout = 0.1
    c.optim.update(name="radam", lr=1e-4, warmup_steps=0, grad_clip=0.0)
    c.edm.update(p_mean=-1.2, p_std=1.2, sample_steps=40)
    c.sample.edm_steps = 40
    c.train.num_steps = 600_000
    common.apply_small_lsun_variant(c, variant if small else None, "lsun256_edm")
    if variant == "cpu":
        c.optim.lr = 1e-3
        c.edm.sample_steps = c.sample.edm_steps = 18
    elif variant == "test":
        c.edm.sample_steps = 3
    return c
