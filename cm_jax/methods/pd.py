"""Progressive distillation, PD (Salimans & Ho 2022), the CM paper's baseline: an EDM denoiser
learns in one Euler step what its teacher θ⁻ does in two, and the student becomes the teacher
at every stage, halving the steps from schedule.pd_start_scales to 1.

Its stages run inside the train step: at the first step of a stage θ⁻ ← θ, the optimizer
restarts and so do the evaluation EMAs (the official `reset_training_for_progdist`); within a
stage θ⁻ is held and the learning rate decays (`update_scale`)."""

import functools

import jax

from cm_jax import karras, ode, precond, schedules
from cm_jax.methods import base


def pd_target(teacher_denoise, x_hi, sigma_hi, sigma_mid, sigma_lo):
    """PD's regression target: the denoised image x̃ whose single Euler step from σ_hi lands
    where the teacher's two Euler half-steps σ_hi → σ_mid → σ_lo land (Salimans & Ho 2022,
    Algorithm 2, in EDM's σ parameterisation as the official CM code):

      x_lo = Euler(Euler(x_hi, σ_hi → σ_mid), σ_mid → σ_lo),
      x̃   = x_hi − σ_hi·(x_lo − x_hi)/(σ_lo − σ_hi).
    """
    x_mid = ode.euler_step(teacher_denoise, x_hi, sigma_hi, sigma_mid)
    x_lo = ode.euler_step(teacher_denoise, x_mid, sigma_mid, sigma_lo)
    slope = (x_lo - x_hi) / karras.per_example(sigma_lo - sigma_hi, x_hi)
    return x_hi - karras.per_example(sigma_hi, x_hi) * slope


def progressive_distillation_loss(net, config, teacher_net=None):
    """L_PD: the student D_θ at σ_hi regresses on `pd_target` of the teacher D_θ⁻.

    The student's N steps are the intervals of an (N+1)-point Karras grid from σ_max to σ_min
    (N from the `pd` schedule); each example draws one interval uniformly, σ_mid is its
    midpoint in σ^{1/ρ}. The teacher θ⁻ is the previous stage's student (the EDM teacher in the
    first stage), lives in the train state and runs deterministic; the weight is the official
    `truncated_snr` max(1/σ_hi², 1) by default (loss.weighting).
    """
    del teacher_net  # The teacher is the state's θ⁻, built from the same network.
    kc, lc, sched = config.karras, config.loss, config.schedule
    grid = karras.grid(kc)
    distance = base.metric(lc)
    denoiser = functools.partial(precond.edm_denoiser, net, sigma_data=kc.sigma_data)

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        x, labels = batch["image"], base.class_labels(batch, config.model)
        num_steps = schedules.pd_num_scales(step, sched.pd_start_scales, sched.pd_stage_steps)
        index_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        j = jax.random.randint(index_rng, (x.shape[0],), 0, num_steps)
        sigma_lo, sigma_mid, sigma_hi = (
            karras.karras_sigma(j + d, num_steps + 1, **grid) for d in (0.0, 0.5, 1.0)
        )
        x_hi = x + karras.per_example(sigma_hi, x) * jax.random.normal(noise_rng, x.shape, x.dtype)
        student = denoiser(params, x_hi, sigma_hi, labels, train=True, dropout_rng=dropout_rng)
        teacher = lambda v, s: denoiser(target_params, v, s, labels)
        target = jax.lax.stop_gradient(pd_target(teacher, x_hi, sigma_hi, sigma_mid, sigma_lo))
        return base.weighted_loss(
            distance(student, target, frozen),
            sigma_lo,
            sigma_hi,
            lc.weighting,
            num_scales=num_steps,
        )

    return loss_fn


class PD(base.Method):
    name = "pd"
    has_target_network = True  # θ⁻ is the teacher of the current stage.
    student_start = base.ALWAYS
    sampler = "pd"
    staged = True

    def loss_fn(self, net, config, teacher_net=None):
        return progressive_distillation_loss(net, config, teacher_net)

    def check_config(self, config):
        if config.schedule.kind != "pd":
            raise ValueError(
                f"method='pd' with schedule.kind={config.schedule.kind!r}: progressive "
                "distillation needs both to be 'pd' (configs/cifar10_pd.py)."
            )
        schedules.check_pd_schedule(config.schedule.pd_start_scales, config.schedule.pd_stage_steps)
        base.require_teacher(self, config, "PD distils an EDM teacher")

    def target_ema(self, step, config):
        return None  # Held within a stage; replaced by θ when a stage starts (`begin_step`).

    def begin_step(self, state, tx, config):
        """At the first step of a stage: θ⁻ ← θ, a fresh optimizer (moments and step count) and
        the evaluation EMAs restarted from θ."""
        sched = config.schedule
        due = schedules.pd_starts_stage(state.step, sched.pd_start_scales, sched.pd_stage_steps)
        restarted = lambda s: s.replace(
            target_params=s.params,
            opt_state=tx.init(s.params),
            ema_params={key: s.params for key in s.ema_params},
        )
        return jax.lax.cond(due, restarted, lambda s: s, state)

    def update_scale(self, step, config):
        """The learning rate's decay within a stage; the optimizers scale by the rate last, so
        scaling the update scales the rate."""
        sched = config.schedule
        return schedules.pd_lr_factor(step, sched.pd_start_scales, sched.pd_stage_steps)

    def learned_steps(self, config, step):
        sched = config.schedule
        return schedules.pd_learned_steps(step, sched.pd_start_scales, sched.pd_stage_steps)
