"""CIFAR-10 consistency training (CT) from scratch, as in the CM paper.

Consistency training (CT) on CIFAR-10, as in the CM paper (Song et al. 2023).

Values from the official consistency_models_cifar10 `cifar10_ve_ct_adaptive` config and its
launch.sh: batch 512, RAdam 4e-4 (no warm-up, no clipping), 800k steps, eval EMA 0.9999,
dropout 0, the adaptive curriculum s0 = 2 → s1 = 150 with μ0 = 0.9, uniform weighting.

μ(k) formula: "official" (exp(s0·ln μ0/(N−1)), what produced the published FID); set
--config.schedule.mu_formula=paper for the formula as printed in the paper.

Metric: LPIPS, as the paper. It needs the ImageNet VGG16 backbone, which no package ships: give
its file with --config.loss.lpips_vgg_path (see cm_jax/lpips.py); --config.loss.distance=l2
runs the l2 variant instead.

Variants: `cifar10_ct.py` (paper), `cifar10_ct.py:cpu` (tiny model, l2, minutes on a CPU),
`cifar10_ct.py:test` (test suite).
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    c = common.base_config()
    c.method = "ct"
    c.teacher.init_student = False  # cifar10_ve_ct_adaptive.py: finetune=False
    c.loss.distance = "lpips"
    c.schedule.update(kind="ct", s0=2, s1=150, mu0=0.9, mu_formula="official")
    c.optim.update(name="radam", lr=4e-4)
    c.train.update(batch_size=512, num_steps=800_000, ema_rates=(0.9999,))
    if variant == "cpu":
        common.apply_cpu_variant(c)
        c.loss.distance = "l2"
    elif variant == "test":
        common.apply_test_variant(c)
        c.loss.distance = "l2"
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of cifar10_ct: use cpu or test.")
    return c
