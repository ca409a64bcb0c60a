"""CIFAR-10 EDM diffusion teacher (NCSN++), the teacher of CD, PD, ECT and sCM.

The EDM diffusion teacher on CIFAR-10 (Karras et al. 2022), as the official CM code trains it
(`cifar10_k_ve`): NCSN++ with dropout 0.13, batch 512, Adam 1e-3 with a warm-up over 10M images
(19,531 steps), no clipping, 400k steps, eval EMA with a half-life of 0.5M images (0.99929 per
step at batch 512), lognormal σ (P_mean −1.2, P_std 1.2), EDM weighting. Sample grids use the
Heun sampler with 18 steps (35 network evaluations).

Variants: paper (default); `:scm`, the teacher of sCT and sCD (`cifar10_sct.py`,
`cifar10_scd.py`): the same recipe with positional time embeddings, as the sCM paper's teacher
(Lu & Song 2025, whose teacher also has TrigFlow's parameterisation, equivalent to EDM's
preconditioning up to the noise conditioning, and adaptive double normalisation, which is not
here); `:cpu`; `:test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("scm", "cpu", "test")


def get_config(variant=None):
    c = common.base_config()
    c.method = "edm"
    c.model.dropout = 0.13
    c.optim.update(name="adam", lr=1e-3, warmup_steps=19_531, grad_clip=0.0)
    c.edm.update(p_mean=-1.2, p_std=1.2)
    c.sample.edm_steps = 18
    # A half-life of 0.5M images at batch 512 (cifar10_k_ve.py: exp(ln 0.5 / (0.5e6 / 512))).
    c.train.update(
        batch_size=512,
        num_steps=400_000,
        ema_rates=(common.ema_rate_for_half_life(500_000, 512),),
    )
    c.sample.clip_denoised = False  # The JAX Heun sampler does not clip (jcm/sampling.py).
    if variant == "scm":
        common.apply_scm_network(c.model)
    elif variant == "cpu":
        common.apply_cpu_variant(c)
        c.optim.update(lr=1e-3, warmup_steps=200)
    elif variant == "test":
        common.apply_test_variant(c)
        c.optim.warmup_steps = 2
        c.sample.edm_steps = 3
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of cifar10_edm: use scm, cpu or test.")
    return c
