"""CIFAR-10 progressive distillation (PD), the CM paper's baseline.

Progressive distillation (Salimans & Ho 2022) of the CIFAR-10 EDM teacher: the CM paper's
baseline, as the official `cifar10_ve_progressive_distillation` config runs it.

The student (NCSN++ as an EDM denoiser, initialised from the teacher's EMA) learns in N Euler
steps what its teacher does in 2N; N starts at 4096 and halves every 50k steps, the student
becoming the teacher each time, down to 2 (100k steps) and then 1 (from step 650k). Adam 5e-5
decaying linearly to 0 within each stage, gradients clipped at norm 1, l2 loss weighted by
max(1/σ², 1) (`truncated_snr`), batch 512, 800k steps, no dropout, eval EMA rate 0 (the
weights themselves, as the official config).

    python launch.py --config=configs/cifar10_pd.py --workdir=workdirs/pd \\
        --config.teacher.workdir=workdirs/edm

Variants: paper (default), `:cpu` (distils a `cifar10_edm.py:cpu` teacher from 8 steps to 1
in 600 steps of 100-step stages), `:test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    c = common.base_config()
    c.method = "pd"
    c.loss.update(distance="l2", weighting="truncated_snr")
    c.schedule.update(kind="pd", pd_start_scales=4096, pd_stage_steps=50_000)
    c.optim.update(
        name="adam", lr=5e-5, warmup_steps=0, grad_clip=1.0, beta1=0.9, beta2=0.999, eps=1e-8
    )
    c.train.update(batch_size=512, num_steps=800_000, ema_rates=(0.0,))
    if variant == "cpu":
        common.apply_cpu_variant(c)
        # 8 → 4 → 2 → 1 steps: stages of 100, 100, 200 and 200 steps. The paper's rate is for
        # batch 512 and 50k-step stages; a tiny model in short stages needs a larger one.
        c.schedule.update(pd_start_scales=8, pd_stage_steps=100)
        c.optim.lr = 2e-4
        c.train.ema_rates = (0.0,)
    elif variant == "test":
        common.apply_test_variant(c)
        # 4 → 2 → 1 steps within the test's 4 steps: stages at k = 0, 1 and 3.
        c.schedule.update(pd_start_scales=4, pd_stage_steps=1)
        c.train.ema_rates = (0.0, 0.9)
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of cifar10_pd: use cpu or test.")
    return c
