"""Consistency training, CT (CM Algorithm 3), and its improved recipe iCT (Song & Dhariwal
2024): the config picks the curriculum (schedule.kind ct or ict), the pair sampling, the
weighting λ and the metric d. `consistency_loss` is the body CT shares with distillation
(cd.py), which differs only in how the target's input is made."""

import functools

import jax

from cm_jax import karras, precond, schedules
from cm_jax.methods import base


def consistency_loss(net, config, target_input):
    """The body shared by CT and CD (CM Algorithms 2 and 3).

    One example: draw the pair (σ_i, σ_{i+1}) and z ~ N(0, I), x_{i+1} = x + σ_{i+1}·z, then
      online = f_θ(x_{i+1}, σ_{i+1})
      target = sg(f_θ⁻(x̂_i, σ_i)),  x̂_i = target_input(...), one ODE step to σ_i
      loss   = λ(σ_i, σ_{i+1}) · d(online, target).
    Both passes use the same dropout key, as the official code does, so they see the same
    dropout mask and differ only in their inputs and parameters.
    """
    kc, lc, sched = config.karras, config.loss, config.schedule
    grid = karras.grid(kc)
    distance = base.metric(lc)
    max_scales = schedules.max_num_scales(sched)
    total_steps = base.curriculum_steps(config)
    f = functools.partial(
        precond.consistency_fn, net, sigma_data=kc.sigma_data, sigma_min=kc.sigma_min, train=True
    )

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        x, labels = batch["image"], base.class_labels(batch, config.model)
        num_scales, _ = schedules.num_scales_and_target_ema(step, sched, total_steps)
        index_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        i = schedules.sample_pair_index(
            index_rng,
            x.shape[0],
            num_scales,
            lc.index_sampling,
            max_scales,
            lc.p_mean,
            lc.p_std,
            **grid,
        )
        sigma_lo = karras.karras_sigma(i, num_scales, **grid)
        sigma_hi = karras.karras_sigma(i + 1, num_scales, **grid)
        z = jax.random.normal(noise_rng, x.shape, x.dtype)
        x_hi = x + karras.per_example(sigma_hi, x) * z

        online = f(params, x_hi, sigma_hi, labels, dropout_rng=dropout_rng)
        x_lo = jax.lax.stop_gradient(target_input(frozen, x, z, x_hi, sigma_hi, sigma_lo, labels))
        target = f(target_params, x_lo, sigma_lo, labels, dropout_rng=dropout_rng)
        target = jax.lax.stop_gradient(target)

        return base.weighted_loss(
            distance(online, target, frozen),
            sigma_lo,
            sigma_hi,
            lc.weighting,
            num_scales=num_scales,
        )

    return loss_fn


def consistency_training_loss(net, config, teacher_net=None):
    """L_CT (CM Algorithm 3; iCT with pseudo-Huber, lognormal pairs and λ = 1/Δσ).

    The target input is one Euler step of the PF-ODE from σ_{i+1} to σ_i that uses the clean
    image as the denoiser: x_{i+1} − (σ_{i+1} − σ_i)·(x_{i+1} − x)/σ_{i+1} = x + σ_i·z exactly.
    """
    del teacher_net

    def clean_image_euler_step(frozen, x, z, x_hi, sigma_hi, sigma_lo, labels):
        return x + karras.per_example(sigma_lo, x) * z

    return consistency_loss(net, config, clean_image_euler_step)


class CT(base.Method):
    name = "ct"
    has_target_network = True
    # The official ImageNet-64 and LSUN runs start from their EDM teacher's weights
    # (openai/consistency_models cm_train.py); the loss never calls the teacher.
    student_start = base.OPTIONAL

    def loss_fn(self, net, config, teacher_net=None):
        return consistency_training_loss(net, config, teacher_net)

    def check_config(self, config):
        super().check_config(config)
        base.require_teacher(self, config, "This CT recipe starts from a pretrained EDM model")
