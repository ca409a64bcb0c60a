"""CIFAR-10 improved consistency training (iCT), one-step FID 2.51 in its paper.

Improved consistency training (iCT) on CIFAR-10 (Song & Dhariwal, ICLR 2024).

- θ⁻ = stop_gradient(θ) (μ = 0), so the EMA 0.99993 serves sampling only;
- pseudo-Huber metric over the whole image with c = 0.00054·√d;
- discretised lognormal pair sampling (P_mean −1.1, P_std 2.0) and λ = 1/(σ_{i+1} − σ_i);
- exponential curriculum s0 = 10 → s1 = 1280 (N doubles every 50k of the 400k steps);
- batch 1024, 400k steps, dropout 0.3, Fourier-embedding scale 0.02.
Not yet checked against the paper's own table, but what secondary sources give (reading notes
of the paper, the diffusers iCT script; the sCM paper says positional embeddings "amount to
s ≈ 0.02"): the optimizer (RAdam, lr 1e-4), batch 1024, EMA 0.99993, dropout 0.3 and the
Fourier scale 0.02. The μ(k) formula does not apply (μ = 0).

Variants: paper (default), `:cpu` (tiny model, minutes on a CPU), `:test` (test suite).
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    c = common.base_config()
    c.method = "ct"
    c.teacher.init_student = False  # iCT trains from scratch
    c.sample.two_step_sigmas = (80.0, 0.821)
    c.model.update(dropout=0.3, fourier_scale=0.02)
    c.loss.update(
        distance="pseudo_huber",
        huber_c=-1.0,
        weighting="ict",
        index_sampling="lognormal",
        p_mean=-1.1,
        p_std=2.0,
    )
    c.schedule.update(kind="ict", s0=10, s1=1280)
    c.optim.update(name="radam", lr=1e-4)
    c.train.update(batch_size=1024, num_steps=400_000, ema_rates=(0.99993,))
    if variant == "cpu":
        common.apply_cpu_variant(c)
        c.model.update(dropout=0.0, fourier_scale=0.02)
        # The curriculum is compressed with the run: N doubles every num_steps/8 steps.
        c.optim.lr = 2e-4
    elif variant == "test":
        common.apply_test_variant(c)
        c.model.update(dropout=0.3, fourier_scale=0.02)
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of cifar10_ict: use cpu or test.")
    return c
