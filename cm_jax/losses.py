"""Training objectives. Each builder returns a pure function

    loss_fn(params, target_params, batch, rng, step, frozen=None) -> (loss, metrics)

where batch = {'image': [B,H,W,C] in [−1, 1], 'label': [B]}, rng is this step's key, step
the (possibly traced) optimizer step k that drives the curricula, and frozen a dict with the
parameters of the fixed networks the method reads: "teacher" (CD) and "lpips" (the LPIPS
metric). They enter as arguments, not closures, so they are not baked into the compiled step.
Methods:

- "edm": EDM denoising score matching, to train the diffusion teacher (Karras et al. 2022).
- "ct":  consistency training (CM Algorithm 3) and its iCT refinements, chosen by config:
         the curriculum (schedules.py), the pair sampling, the weighting λ and the metric d.
- "cd":  consistency distillation (CM Algorithm 2) from an EDM teacher, same options.
- "pd":  progressive distillation (Salimans & Ho 2022), the CM paper's baseline: an EDM
         denoiser learns in one Euler step what its teacher θ⁻ does in two.
- "ect": easy consistency training (Geng et al. 2025): CT in continuous time with a gap
         t − r that shrinks by stages, started from a pretrained EDM model.
- "sct", "scd": sCM (Lu & Song 2025), consistency training and distillation in continuous
         time: the gap is zero and the target's change is a JVP in TrigFlow coordinates.
"""

import functools

import jax
import jax.numpy as jnp

from cm_jax import distances, karras, lpips, ode, precond, schedules, trigflow
from cm_jax.models import uncertainty


def _labels(batch, model_config):
    return batch["label"] if model_config.num_classes > 0 else None


def total_curriculum_steps(config):
    """K in the curricula: schedule.total_steps, or the run's length when it is 0."""
    return int(config.schedule.total_steps or config.train.num_steps)


def metric(loss_config):
    """d(x, y, frozen) -> [B]: LPIPS reads its VGG16 weights from frozen["lpips"]."""
    if loss_config.distance == "lpips":
        return lambda x, y, frozen: lpips.lpips_distance(
            frozen["lpips"], x, y, resize_to=loss_config.lpips_resize
        )
    distance = distances.get_distance(loss_config.distance, loss_config.huber_c)
    return lambda x, y, frozen: distance(x, y)


def _weighted_loss(distances_per_example, sigma_lo, sigma_hi, weighting, **metrics):
    """(mean of λ(σ_lo, σ_hi)·d, metrics): the loss of CT, CD, PD and ECT over a batch."""
    weight = schedules.pair_weight(sigma_lo, sigma_hi, weighting)
    loss = jnp.mean(weight * distances_per_example)
    return loss, {"loss": loss, "unweighted_distance": jnp.mean(distances_per_example), **metrics}


def _consistency_loss(net, config, target_input):
    """The body shared by CT and CD (CM Algorithms 2 and 3).

    One example: draw the pair (σ_i, σ_{i+1}) and z ~ N(0, I), x_{i+1} = x + σ_{i+1}·z, then
      online = f_θ(x_{i+1}, σ_{i+1})
      target = sg(f_θ⁻(x̂_i, σ_i)),  x̂_i = target_input(...), one ODE step to σ_i
      loss   = λ(σ_i, σ_{i+1}) · d(online, target).
    Both passes use the same dropout key, as the official code does, so they see the same
    dropout mask and differ only in their inputs and parameters.
    """
    kc, lc, sc = config.karras, config.loss, config.schedule
    grid = dict(sigma_min=kc.sigma_min, sigma_max=kc.sigma_max, rho=kc.rho)
    distance = metric(lc)
    max_scales = schedules.max_num_scales(sc)
    total_steps = total_curriculum_steps(config)
    f = functools.partial(
        precond.consistency_fn, net, sigma_data=kc.sigma_data, sigma_min=kc.sigma_min, train=True
    )

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        x, labels = batch["image"], _labels(batch, config.model)
        num_scales, _ = schedules.num_scales_and_target_ema(step, sc, total_steps)
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

        return _weighted_loss(
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

    return _consistency_loss(net, config, clean_image_euler_step)


def consistency_distillation_loss(net, config, teacher_net):
    """L_CD (CM Algorithm 2): the target input is one step of the teacher's PF-ODE from σ_{i+1}
    to σ_i (Heun by default, as the paper; `teacher.solver=euler` for the first-order one).

    frozen["teacher"] holds the teacher's parameters (its evaluation EMA); the teacher runs
    deterministic (no dropout), as an ODE solver must.
    """
    if teacher_net is None:
        raise ValueError("method 'cd' needs a teacher: set config.teacher.workdir.")
    solver = ode.SOLVERS[config.teacher.solver]
    sigma_data = config.karras.sigma_data

    def teacher_ode_step(frozen, x, z, x_hi, sigma_hi, sigma_lo, labels):
        denoise = lambda v, s: precond.edm_denoiser(
            teacher_net, frozen["teacher"], v, s, labels, sigma_data=sigma_data
        )
        return solver(denoise, x_hi, sigma_hi, sigma_lo)

    return _consistency_loss(net, config, teacher_ode_step)


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
    del teacher_net  # The teacher only initialises θ (trainer.initial_student).
    kc, lc, ec = config.karras, config.loss, config.ect
    distance = metric(lc)
    f = functools.partial(
        precond.consistency_fn,
        net,
        sigma_data=kc.sigma_data,
        train=True,
        sigma_min=kc.sigma_min if ec.boundary_in_training else 0.0,
    )

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        del target_params  # ECT's target is the online network itself, without gradient.
        x, labels = batch["image"], _labels(batch, config.model)
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        t = schedules.edm_sample_sigma(t_rng, x.shape[0], lc.p_mean, lc.p_std)
        stage = schedules.ect_stage(step, ec.stage_steps)
        r = schedules.ect_r(t, stage, ec.q, ec.k, ec.b, ec.mapping)
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

        return _weighted_loss(
            distance(online, target, frozen),
            r,
            t,
            lc.weighting,
            ect_stage=stage,
            target_at_data=jnp.mean(at_data),
        )

    return loss_fn


def difference_step(config):
    """scm.jvp_eps, or when it is 0 a step for the compute dtype: 1e-3 of t in float32, 0.05 in
    bfloat16, whose round-off swamps a small difference. On the sCT :cpu network the θ-gradient
    was off by 42 % with 1e-3 in bfloat16 and by 9 % with 0.05, where jax.jvp in bfloat16 is
    off by 8 % (all against float32 jax.jvp)."""
    if config.scm.jvp_eps > 0:
        return config.scm.jvp_eps
    return 0.05 if config.model.get("dtype", "float32") == "bfloat16" else 1e-3


def continuous_consistency_loss(net, config, teacher_net=None):
    """L_sCM (Lu & Song 2025, Algorithm 1) of sCT (method "sct") and sCD ("scd"), θ⁻ = sg(θ).

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
    distill = config.method == "scd"
    if distill and teacher_net is None:
        raise ValueError("method 'scd' needs a teacher: set config.teacher.workdir.")
    kc, lc, sc = config.karras, config.loss, config.scm
    sigma_data = kc.sigma_data
    velocity = functools.partial(precond.trigflow_velocity, net, sigma_data=sigma_data, train=True)

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        del target_params  # θ⁻ = stop_gradient(θ).
        x0, labels = batch["image"], _labels(batch, config.model)
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
        if sc.jvp == "autodiff":
            F_minus, dF_minus = jax.jvp(
                frozen_velocity, (x_t, t), (karras.per_example(cos_sin, x_t) * dx_dt, cos_sin)
            )
        else:  # "finite_difference": the same directional derivative, from two more passes.
            F_minus = jax.lax.stop_gradient(F)
            dF_minus = karras.per_example(cos_sin, x_t) * trigflow.central_difference(
                frozen_velocity, x_t, t, dx_dt, difference_step(config)
            )
        warmup = trigflow.tangent_warmup(step, sc.tangent_warmup_steps)
        g = trigflow.tangent(F_minus, dF_minus, x_t, dx_dt, t, warmup, sigma_data)
        g_normalized = trigflow.normalize_tangent(g, sc.tangent_norm_c, sc.tangent_norm)
        residual = F - jax.lax.stop_gradient(F) - jax.lax.stop_gradient(g_normalized)
        mean_square = jnp.mean(residual.reshape(x0.shape[0], -1) ** 2, axis=1)

        u = uncertainty.log_variance(
            params, karras.noise_conditioning(sigma), sc.uncertainty_channels
        )
        weight = 1.0 / sigma if sc.prior_weighting else 1.0
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


def edm_loss(net, config, teacher_net=None):
    """EDM denoising score matching (Karras et al. 2022, Eq. 8 with Table 1's choices):

    ln σ ~ N(P_mean, P_std²), n ~ N(0, σ²I), loss = λ(σ)·‖D_θ(x + n; σ) − x‖²/d.
    The squared error is averaged over pixels (as the official CM code does; EDM sums), which
    only rescales the loss. target_params is unused: a diffusion model has no target network.
    """
    del teacher_net
    kc, ec = config.karras, config.edm

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        del target_params, step, frozen
        x, labels = batch["image"], _labels(batch, config.model)
        sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        sigma = schedules.edm_sample_sigma(sigma_rng, x.shape[0], ec.p_mean, ec.p_std)
        n = karras.per_example(sigma, x) * jax.random.normal(noise_rng, x.shape, x.dtype)
        noisy = x + n
        denoised = precond.edm_denoiser(
            net,
            params,
            noisy,
            sigma,
            labels,
            sigma_data=kc.sigma_data,
            train=True,
            dropout_rng=dropout_rng,
        )
        per_example = schedules.edm_weight(sigma, kc.sigma_data) * distances.l2(denoised, x)
        loss = jnp.mean(per_example)
        return loss, {"loss": loss}

    return loss_fn


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
    kc, lc, sc = config.karras, config.loss, config.schedule
    grid = dict(sigma_min=kc.sigma_min, sigma_max=kc.sigma_max, rho=kc.rho)
    distance = metric(lc)
    denoiser = functools.partial(precond.edm_denoiser, net, sigma_data=kc.sigma_data)

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        x, labels = batch["image"], _labels(batch, config.model)
        num_steps = schedules.pd_num_scales(step, sc.pd_start_scales, sc.pd_stage_steps)
        index_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        j = jax.random.randint(index_rng, (x.shape[0],), 0, num_steps)
        sigma_lo, sigma_mid, sigma_hi = (
            karras.karras_sigma(j + d, num_steps + 1, **grid) for d in (0.0, 0.5, 1.0)
        )
        x_hi = x + karras.per_example(sigma_hi, x) * jax.random.normal(noise_rng, x.shape, x.dtype)
        student = denoiser(params, x_hi, sigma_hi, labels, train=True, dropout_rng=dropout_rng)
        teacher = lambda v, s: denoiser(target_params, v, s, labels)
        target = jax.lax.stop_gradient(pd_target(teacher, x_hi, sigma_hi, sigma_mid, sigma_lo))
        return _weighted_loss(
            distance(student, target, frozen),
            sigma_lo,
            sigma_hi,
            lc.weighting,
            num_scales=num_steps,
        )

    return loss_fn


LOSSES = {
    "ct": consistency_training_loss,
    "cd": consistency_distillation_loss,
    "edm": edm_loss,
    "pd": progressive_distillation_loss,
    "ect": easy_consistency_training_loss,
    "sct": continuous_consistency_loss,
    "scd": continuous_consistency_loss,
}


def get_loss_fn(net, config, teacher_net=None):
    """The loss builder for config.method, applied to the network, config and teacher."""
    if config.method not in LOSSES:
        raise ValueError(f"Unknown method {config.method!r}: use one of {sorted(LOSSES)}.")
    return LOSSES[config.method](net, config, teacher_net)
