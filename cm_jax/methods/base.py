"""What every training method declares, and the loss pieces several of them share.

The trainer, the train state, the teacher loader and the generator never test `config.method`
for a name: they ask the run's `Method` (cm_jax/methods/__init__.py maps the name to it). A
method answers:

- its loss: `loss_fn(net, config, teacher_net)` returns a pure function

      loss_fn(params, target_params, batch, rng, step, frozen=None) -> (loss, metrics)

  where batch = {'image': [B,H,W,C] in [−1, 1], 'label': [B]}, rng is this step's key, step
  the (possibly traced) optimizer step k that drives the curricula, and frozen a dict with the
  parameters of the fixed networks the loss reads: "teacher" and "lpips". They enter as
  arguments, not closures, so they are not baked into the compiled step;
- what the train state holds: a target network θ⁻, an uncertainty head beside θ;
- its teacher: whether the loss reads one (`distills`), whether the student starts from the
  teacher's weights (`student_start`: never, optional with teacher.init_student, or always),
  and whether its own runs can be a teacher (`teaches`);
- its config checks, beyond the ones every run shares;
- its schedule inside the train step: the target EMA μ(k) and, for staged methods, what
  happens at the start of a stage and how the update is scaled;
- how its runs sample by default (`sampler`: a kind that cm_jax/sampling.py implements).
"""

import jax.numpy as jnp

from cm_jax import distances, lpips, schedules

# Whether θ starts from the teacher's weights.
NEVER, OPTIONAL, ALWAYS = "never", "optional (teacher.init_student)", "always"


class Method:
    """The defaults: a method without target network, teacher, uncertainty head or stages,
    whose runs are consistency models."""

    name = ""
    has_target_network = False  # The state keeps θ⁻ (updated by `target_ema`).
    has_uncertainty_head = False  # sCM's learned log-variance sits beside θ.
    distills = False  # The loss reads frozen["teacher"] at every step.
    student_start = NEVER
    teaches = False  # Its runs can be the teacher of CD, PD, ECT and sCM.
    uses_loss_distance = True  # The loss measures with config.loss.distance (LPIPS: weights).
    sampler = "consistency"  # "consistency", "edm" or "pd" (sampling.SAMPLER_KINDS).
    staged = False  # `begin_step` and `update_scale` apply.

    def loss_fn(self, net, config, teacher_net=None):
        raise NotImplementedError(f"method {self.name!r} has no loss")

    def starts_from_teacher(self, config):
        """Whether θ starts from the teacher's weights in this run."""
        return self.student_start == ALWAYS or (
            self.student_start == OPTIONAL and bool(config.teacher.init_student)
        )

    def uses_teacher(self, config):
        """Whether the run needs config.teacher.workdir."""
        return self.distills or self.starts_from_teacher(config)

    def check_config(self, config):
        """One clear error for a setting this method cannot honour."""
        if config.schedule.kind == "pd":
            raise ValueError(
                f"method={self.name!r} with schedule.kind='pd': progressive distillation needs "
                "both to be 'pd' (configs/cifar10_pd.py)."
            )

    def target_ema(self, step, config):
        """μ(k) of the update θ⁻ ← μ·θ⁻ + (1 − μ)·θ, or None to hold θ⁻ (methods with a
        target network only)."""
        _, mu = schedules.num_scales_and_target_ema(step, config.schedule, curriculum_steps(config))
        return mu

    def begin_step(self, state, tx, config):
        """The state a step starts from (staged methods restart at a stage's first step)."""
        return state

    def update_scale(self, step, config):
        """The factor of the optimizer's update at `step` (staged methods only)."""
        raise NotImplementedError(f"method {self.name!r} is not staged")

    def learned_steps(self, config, step):
        """The sampling steps a run has learned by `step`, which may be traced (the "pd"
        sampler); 0 for the others, whose steps are a choice at sampling time."""
        return 0


def require_teacher(method, config, why):
    """A clear error when `method` needs config.teacher.workdir and it is empty."""
    if method.uses_teacher(config) and not config.teacher.workdir:
        remedy = (
            ", or config.teacher.init_student=False to train from scratch"
            if method.student_start == OPTIONAL and not method.distills
            else ""
        )
        raise ValueError(
            f"{why}: set config.teacher.workdir to a method='edm' run (or one of its "
            f"checkpoints){remedy}."
        )


# ---------------------------------------------------------------------------------------------
# Loss pieces shared by several methods


def class_labels(batch, model_config):
    """The batch's labels for a class-conditional network, None for an unconditional one."""
    return batch["label"] if model_config.num_classes > 0 else None


def curriculum_steps(config):
    """K in the curricula: schedule.total_steps, or the run's length when it is 0."""
    return int(config.schedule.total_steps or config.train.num_steps)


def metric(loss_config):
    """d(x, y, frozen) -> [B]: LPIPS reads its VGG16 weights from frozen["lpips"]."""
    if loss_config.distance == "lpips":
        variant = loss_config.get("lpips_variant", "lpips")
        return lambda x, y, frozen: lpips.lpips_distance(
            frozen["lpips"], x, y, resize_to=loss_config.lpips_resize, variant=variant
        )
    distance = distances.get_distance(loss_config.distance, loss_config.huber_c)
    return lambda x, y, frozen: distance(x, y)


def weighted_loss(distances_per_example, sigma_lo, sigma_hi, weighting, **metrics):
    """(mean of λ(σ_lo, σ_hi)·d, metrics): the loss of CT, CD, PD and ECT over a batch."""
    weight = schedules.pair_weight(sigma_lo, sigma_hi, weighting)
    loss = jnp.mean(weight * distances_per_example)
    return loss, {"loss": loss, "unweighted_distance": jnp.mean(distances_per_example), **metrics}
