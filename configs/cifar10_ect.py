"""CIFAR-10 easy consistency training (ECT), started from an EDM run.

Easy consistency training (ECT) on CIFAR-10 (Geng et al., ICLR 2025, "Consistency Models
Made Easy"), as the official `run_ecm.sh` runs it (locuslab/ect):

- θ starts from a pretrained EDM diffusion model (`--transfer`): --config.teacher.workdir;
- t ~ LogNormal(−1.1, 2.0), r = t − Δt with Δt/t = 2^{−(s+1)}·(1 + 8·sigmoid(−t)), the stage s
  rising every 25k steps (8 stages in 200k steps), θ⁻ = stop_gradient(θ);
- loss ‖f_θ(x_t, t) − f_θ⁻(x_r, r)‖₂ over the whole image (pseudo-Huber with c = 0), weighted
  by 1/(t − r);
- training uses the plain EDM scalings, sampling the boundary scalings with σ_min = 0.003
  (`ECMPrecond`);
- batch 128, RAdam 1e-4 (β 0.9, 0.999), no warm-up or clipping, dropout 0.2, no flips,
  200k steps (25.6M images), eval EMA 0.9999. Two-step sampling uses t = (80, 0.821).
The official run transfers EDM's DDPM++ (VP) network; this config starts from whatever
`configs/cifar10_edm.py` trained (NCSN++), since θ must have its starting point's network.

    python launch.py --config=configs/cifar10_ect.py --workdir=workdirs/ect \
        --config.teacher.workdir=workdirs/edm

Variants: paper (default); `1hour` (`run_ecm_1hour.sh`: q = 256 in a single stage, EMA
0.9993); `cpu` (starts from a `cifar10_edm.py:cpu` teacher, 600 steps in 6 stages); `test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("1hour", "cpu", "test")


def get_config(variant=None):
    c = common.base_config()
    c.method = "ect"
    c.karras.sigma_min = 0.003
    c.model.dropout = 0.2
    c.data.random_flip = False
    c.loss.update(distance="pseudo_huber", huber_c=0.0, weighting="ict", p_mean=-1.1, p_std=2.0)
    c.ect.update(
        mapping="sigmoid", q=2.0, k=8.0, b=1.0, stage_steps=25_000, boundary_in_training=False
    )
    c.optim.update(
        name="radam", lr=1e-4, warmup_steps=0, grad_clip=0.0, beta1=0.9, beta2=0.999, eps=1e-8
    )
    c.train.update(batch_size=128, num_steps=200_000, ema_rates=(0.9999,))
    c.teacher.update(init_student=True)
    c.sample.two_step_sigmas = (80.0, 0.821)  # ct_eval.py --mid_t 0.821
    if variant == "1hour":
        c.ect.update(q=256.0, stage_steps=c.train.num_steps)
        c.train.ema_rates = (0.9993,)
    elif variant == "cpu":
        common.apply_cpu_variant(c)  # The network of a cifar10_edm.py:cpu teacher.
        c.ect.stage_steps = 100
        c.optim.lr = 2e-4
    elif variant == "test":
        common.apply_test_variant(c)
        c.ect.stage_steps = 2
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of cifar10_ect: use 1hour, cpu or test.")
    return c
