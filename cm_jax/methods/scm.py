"""sCM (Lu & Song 2025, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models"): consistency training (sCT) and distillation (sCD) in continuous time. The gap is zero
and the target's rate of change is a JVP in TrigFlow coordinates (trigflow.py); a learned
log-variance head beside θ (models/uncertainty.py) weights the loss per noise level."""

import functools

import jax
import jax.numpy as jnp

from cm_jax import karras, precond, schedules, trigflow
from cm_jax.methods import base
from cm_jax.models import uncertainty


def difference_step(config):
    """scm.jvp_eps, or when it is 0 a step for the compute dtype: 1e-3 of t in float32, 0.05 in
    bfloat16, whose round-off swamps a small difference. On the sCT :cpu network the θ-gradient
    was off by 42 % with 1e-3 in bfloat16 and by 9 % with 0.05, where jax.jvp in bfloat16 is
    off by 8 % (all against float32 jax.jvp)."""
    if config.scm.jvp_eps > 0:
        return config.scm.jvp_eps
    return 0.05 if config.model.get("dtype", "float32") == "bfloat16" else 1e-3


def continuous_consistency_loss(net, config, teacher_net=None, distill=False):
    """L_sCM (Lu & Song 2025, Algorithm 1) of sCT and, with `distill`, sCD, θ⁻ = sg(θ).

    One example, in TrigFlow coordinates (trigflow.py): ln σ ~ N(P_mean, P_std²),
    t = arctan(σ/σ_d), z ~ N(0, σ_d²I), x_t = cos(t)·x_0 + sin(t)·z, and
      dx_t/dt = cos(t)·z − sin(t)·x_0 (sCT) or σ_d·F_teacher(x_t/σ_d, t) (sCD),
      (F⁻, cos·sin·dF⁻/dt) = JVP of F_θ⁻ at (x_t, t) along (cos·sin·dx_t/dt, cos·sin)
                             (or central differences: scm.jvp="finite_difference"),
      g = the tangent (trigflow.tangent), normalised, held constant,
      loss = w(t)·e^{−u_φ(t)}·‖F_θ − F⁻ − g‖²/D + u_φ(t),  w = 1/σ (prior weighting),
    with u_φ the learned log-variance (models/uncertainty.py). F_θ − F⁻ is zero in value, so the
    gradient in θ is −2·w·e^{−u}/D·gᵀ∇F_θ: the continuous-time consistency gradient, made
    stable by the normalisation and the warm-up of g. Both passes (F_θ and the JVP of F_θ⁻) use
    the same dropout key, so F⁻ equals F_θ; the sCD teacher runs deterministic.
    """
    if distill and teacher_net is None:
        raise ValueError("method 'scd' needs a teacher: set config.teacher.workdir.")
    kc, lc, scm = config.karras, config.loss, config.scm
    sigma_data = kc.sigma_data
    velocity = functools.partial(precond.trigflow_velocity, net, sigma_data=sigma_data, train=True)

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        del target_params  # θ⁻ = stop_gradient(θ).
        x0, labels = batch["image"], base.class_labels(batch, config.model)
        sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        sigma = schedules.edm_sample_sigma(sigma_rng, x0.shape[0], lc.p_mean, lc.p_std)
        t = trigflow.time_from_sigma(sigma, sigma_data)
        z = sigma_data * jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x_t = trigflow.noisy(x0, z, t)
        if distill:
            dx_dt = sigma_data * precond.trigflow_velocity(
                teacher_net, frozen["teacher"], x_t, t, labels, sigma_data=sigma_data
            )
        else:
            dx_dt = trigflow.training_velocity(x0, z, t)
        dx_dt = jax.lax.stop_gradient(dx_dt)

        F = velocity(params, x_t, t, labels, dropout_rng=dropout_rng)
        frozen_velocity = lambda x, s: velocity(
            jax.lax.stop_gradient(params), x, s, labels, dropout_rng=dropout_rng
        )
        cos_sin = jnp.cos(t) * jnp.sin(t)
        if scm.jvp == "autodiff":
            F_minus, dF_minus = jax.jvp(
                frozen_velocity, (x_t, t), (karras.per_example(cos_sin, x_t) * dx_dt, cos_sin)
            )
        else:  # "finite_difference": the same directional derivative, from two more passes.
            F_minus = jax.lax.stop_gradient(F)
            dF_minus = karras.per_example(cos_sin, x_t) * trigflow.central_difference(
                frozen_velocity, x_t, t, dx_dt, difference_step(config)
            )
        warmup = trigflow.tangent_warmup(step, scm.tangent_warmup_steps)
        g = trigflow.tangent(F_minus, dF_minus, x_t, dx_dt, t, warmup, sigma_data)
        g_normalized = trigflow.normalize_tangent(g, scm.tangent_norm_c, scm.tangent_norm)
        residual = F - jax.lax.stop_gradient(F) - jax.lax.stop_gradient(g_normalized)
        mean_square = jnp.mean(residual.reshape(x0.shape[0], -1) ** 2, axis=1)

        u = uncertainty.log_variance(
            params, karras.noise_conditioning(sigma), scm.uncertainty_channels
        )
        weight = 1.0 / sigma if scm.prior_weighting else 1.0
        loss = jnp.mean(weight * jnp.exp(-u) * mean_square + u)
        tangent_rms = jnp.sqrt(jnp.mean(g.reshape(x0.shape[0], -1) ** 2, axis=1))
        return loss, {
            "loss": loss,
            "unweighted_distance": jnp.mean(mean_square),
            "log_variance": jnp.mean(u),
            "tangent_warmup": warmup,
            "tangent_rms": jnp.mean(tangent_rms),
        }

    return loss_fn


class SCT(base.Method):
    name = "sct"
    has_uncertainty_head = True
    student_start = base.OPTIONAL
    uses_loss_distance = False  # The loss is its own weighted squared error.

    def loss_fn(self, net, config, teacher_net=None):
        return continuous_consistency_loss(net, config, teacher_net, distill=self.distills)

    def check_config(self, config):
        super().check_config(config)
        base.require_teacher(self, config, self.teacher_requirement)
        check_scm_config(config)

    teacher_requirement = (
        "sCT starts from a pretrained diffusion model, as in the paper (configs/cifar10_edm.py:scm)"
    )


class SCD(SCT):
    name = "scd"
    distills = True
    teacher_requirement = "sCD distils an EDM teacher (configs/cifar10_edm.py:scm)"


def check_scm_config(config):
    """The scm.* settings sCT and sCD share."""
    scm = config.scm
    if scm.jvp not in ("autodiff", "finite_difference"):
        raise ValueError(f"scm.jvp={scm.jvp!r}: use autodiff or finite_difference.")
    if scm.jvp == "autodiff" and config.model.get("attention_impl") == "cudnn":
        raise ValueError(
            "scm.jvp='autodiff' needs forward-mode differentiation through the "
            "network, which cuDNN's fused attention (model.attention_impl='cudnn', "
            "a custom VJP) does not have: use the default attention or "
            "scm.jvp='finite_difference'."
        )
    if not 0 <= scm.jvp_eps < 0.1:
        raise ValueError(f"scm.jvp_eps={scm.jvp_eps} must lie in [0, 0.1) (0: by the dtype).")
    if scm.tangent_norm not in ("rms", "l2"):
        raise ValueError(f"scm.tangent_norm={scm.tangent_norm!r}: use rms or l2.")
    if scm.tangent_norm_c <= 0 or scm.tangent_warmup_steps < 0 or scm.uncertainty_channels < 1:
        raise ValueError(
            f"scm.tangent_norm_c={scm.tangent_norm_c} must be > 0, "
            f"scm.tangent_warmup_steps={scm.tangent_warmup_steps} ≥ 0 and "
            f"scm.uncertainty_channels={scm.uncertainty_channels} ≥ 1."
        )
