"""Easy consistency training, ECT (Geng et al. 2025, "Consistency Models Made Easy";
locuslab/ect): consistency training in continuous time, started from a pretrained EDM run, with
a gap t − r that shrinks by stages (schedules.ect_r)."""

import functools

import jax
import jax.numpy as jnp

from cm_jax import karras, precond, schedules
from cm_jax.methods import base


def easy_consistency_training_loss(net, config, teacher_net=None):
    """L_ECT (Geng et al. 2025, "Consistency Models Made Easy"; locuslab/ect `ECMLoss`):
    consistency training in continuous time, θ⁻ = stop_gradient(θ).

    One example: t ~ LogNormal(P_mean, P_std), r = `schedules.ect_r`(t, stage(k)), one z ~ N(0, I),
      online = f_θ(x + t·z, t)
      target = sg(f_θ(x + r·z, r)), and the clean image x where r = 0 (f(x, 0) = x)
      loss   = λ(r, t)·d(online, target),  λ = 1/(t − r) and d = ‖·‖₂ on CIFAR-10.
    Both passes share the dropout key. While training, f uses the plain EDM scalings (σ_min = 0)
    unless ect.boundary_in_training: the official `ECMPrecond` switches to the σ_min-offset
    boundary scalings only to sample, which here is every other use of a consistency model.
    """
    del teacher_net  # The teacher only initialises θ (ECT.student_start).
    kc, lc, ect = config.karras, config.loss, config.ect
    distance = base.metric(lc)
    f = functools.partial(
        precond.consistency_fn,
        net,
        sigma_data=kc.sigma_data,
        train=True,
        sigma_min=kc.sigma_min if ect.boundary_in_training else 0.0,
    )

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        del target_params  # ECT's target is the online network itself, without gradient.
        x, labels = batch["image"], base.class_labels(batch, config.model)
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        t = schedules.edm_sample_sigma(t_rng, x.shape[0], lc.p_mean, lc.p_std)
        stage = schedules.ect_stage(step, ect.stage_steps)
        r = schedules.ect_r(t, stage, ect.q, ect.k, ect.b, ect.mapping)
        z = jax.random.normal(noise_rng, x.shape, x.dtype)

        online = f(params, x + karras.per_example(t, x) * z, t, labels, dropout_rng=dropout_rng)
        at_data = r <= 0.0
        r_safe = jnp.where(at_data, t, r)  # ln(0) would make the (discarded) rows NaN.
        target = f(
            jax.lax.stop_gradient(params),
            x + karras.per_example(r_safe, x) * z,
            r_safe,
            labels,
            dropout_rng=dropout_rng,
        )
        target = jax.lax.stop_gradient(jnp.where(karras.per_example(at_data, x), x, target))

        return base.weighted_loss(
            distance(online, target, frozen),
            r,
            t,
            lc.weighting,
            ect_stage=stage,
            target_at_data=jnp.mean(at_data),
        )

    return loss_fn


class ECT(base.Method):
    name = "ect"
    student_start = base.OPTIONAL

    def loss_fn(self, net, config, teacher_net=None):
        return easy_consistency_training_loss(net, config, teacher_net)

    def check_config(self, config):
        super().check_config(config)
        schedules.check_ect_schedule(config.ect, config.train.num_steps)
        base.require_teacher(self, config, "ECT starts from a pretrained diffusion model")
