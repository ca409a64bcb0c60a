"""The trainer: the sharded train step and the loop behind `launch.py --mode=train`.

One step (the official order, CM Algorithms 2-3 and openai/consistency_models `run_step`):
  1. gradient of the loss at θ, optimizer update θ ← θ − η·u;
  2. evaluation EMAs θ_r ← r·θ_r + (1 − r)·θ for every configured rate r;
  3. target network θ⁻ ← μ(k)·θ⁻ + (1 − μ(k))·θ  (μ = 0 gives iCT's and CD's θ⁻ = θ).
What differs between methods, the trainer asks the run's method (cm_jax/methods): its loss,
μ(k), and for progressive distillation a step 0 at the start of each stage (θ⁻ ← θ, the student
becoming the teacher, and a fresh optimizer) and the learning rate's decay within a stage.

Sharding: a device mesh with axes ("data", "fsdp") (config.mesh.fsdp devices on the second).
The batch is split over all devices; the state's large arrays (θ, the optimizer's moments, θ⁻,
the EMAs) and the frozen teacher and LPIPS weights are split over "fsdp" and replicated over
"data" (train_state.shardings), so each device holds 1/fsdp of them. The step is written for
one device: XLA's SPMD partitioner inserts the gradient all-reduce (the loss is a mean over the
global batch) and, under FSDP, the all-gathers of the weights and the reduce-scatter of the
gradients. With fsdp 1 (the default) everything is replicated, plain data parallelism. The same
code runs on 1 CPU, 8 fake CPU devices, a GPU, or a TPU pod (each host feeds its rows of the
global batch; see input_pipeline.py). With train.microbatches > 1 the gradient is accumulated
over slices of the batch, for batches whose activations do not fit.
"""

import signal
import time

import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cm_jax import (
    checkpoint,
    config_checks,
    data,
    distributed,
    input_pipeline,
    karras,
    lpips,
    methods,
    metric_logging,
    models,
    optim,
    progress,
    sampling,
    teacher,
    workdir_lock,
)
from cm_jax.models import uncertainty
from cm_jax.train_state import (
    batch_sharding,
    check_fsdp,
    config_mesh,
    count_params,
    ema_key,
    ema_update,
    fsdp_size,
    init_params,
    init_train_state,
    mesh_fsdp,
    replicated,
    shardings,
    state_shardings,
    with_uncertainty_head,
)


# --------------------------------------------------------------------------- one step
def make_train_step(config, net, tx, lr_schedule, mesh, teacher_net=None):
    """jit-compiled (state, batch, frozen) -> (state, metrics), scanning steps_per_call steps
    per call; `frozen` holds the fixed networks' parameters (`load_frozen_networks`).

    The state comes in and goes out with `state_shardings` (split over the mesh's fsdp axis
    or replicated), the batch split over all devices; `frozen` keeps the shardings it was
    placed with (`load_frozen_networks`: the same rule). Under FSDP the gradient is held to
    the parameters' shardings, so that XLA reduce-scatters it (and microbatches accumulate
    only their shard)."""
    method = methods.of(config)
    loss_fn = method.loss_fn(net, config, teacher_net)
    ema_rates = tuple(config.train.ema_rates)
    microbatches = config.train.microbatches
    skip_nonfinite = config.train.get("nonfinite", "stop") == "skip"
    fsdp = mesh_fsdp(mesh) > 1

    def one_step(state, batch, frozen):
        state = method.begin_step(state, tx, config)
        rng = jax.random.fold_in(state.rng, state.step)

        def gradient(rows, key):
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, metrics), grads = grad_fn(
                state.params, state.target_params, rows, key, state.step, frozen
            )
            if fsdp:
                grads = jax.lax.with_sharding_constraint(grads, shardings(grads, mesh))
            return grads, metrics

        grads, metrics = accumulate_gradient(gradient, batch, rng, microbatches, mesh)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr_factor = 1.0
        if method.staged:
            lr_factor = method.update_scale(state.step, config)
            updates = jax.tree.map(lambda u: lr_factor * u, updates)
        params = optax.apply_updates(state.params, updates)
        ema_params = {
            ema_key(r): ema_update(state.ema_params[ema_key(r)], params, r) for r in ema_rates
        }
        target_params = state.target_params
        mu = method.target_ema(state.step, config) if target_params is not None else None
        if mu is not None:
            target_params = ema_update(target_params, params, mu)
            metrics["target_ema"] = mu
        metrics.update(grad_norm=optax.tree.norm(grads), lr=lr_schedule(state.step) * lr_factor)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            target_params=target_params,
            ema_params=ema_params,
            opt_state=opt_state,
        )
        finite = _all_finite(metrics["loss"], grads)
        if skip_nonfinite:  # The update is dropped; the step still counts (the data moves on).
            # One conditional over the whole state: a select per array made the step compile
            # 3.6x as slowly (151 s against 42 s; BENCHMARKS.md, "The non-finite guard's skip
            # mode").
            kept = state.replace(step=state.step + 1)
            new_state = jax.lax.cond(finite, lambda n, o: n, lambda n, o: o, new_state, kept)
        metrics[NONFINITE_STEPS] = jnp.where(finite, 0, 1).astype(jnp.int32)
        metrics[FIRST_NONFINITE_STEP] = jnp.where(finite, NO_STEP, state.step).astype(jnp.int32)
        return new_state, metrics

    def multi_step(state, batches, frozen):
        state, metrics = jax.lax.scan(lambda s, b: one_step(s, b, frozen), state, batches)
        return state, _reduce_steps(metrics)

    spc = config.train.steps_per_call
    state_sharding = state_shardings(config, net, tx, mesh)
    # frozen: as placed (None: the arguments' own shardings); replicated with fsdp 1.
    frozen_sharding = None if fsdp else replicated(mesh)
    return jax.jit(
        one_step if spc == 1 else multi_step,
        in_shardings=(state_sharding, batch_sharding(mesh, spc), frozen_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )


# The step's finiteness report (train.nonfinite): how many of its updates were not finite, and
# the first step that was not (NO_STEP: none). Device values, read at log and save boundaries.
NONFINITE_STEPS, FIRST_NONFINITE_STEP = "nonfinite_steps", "first_nonfinite_step"
NO_STEP = jnp.iinfo(jnp.int32).max


def _all_finite(loss, grads):
    """Whether the loss and every gradient are finite: one fused reduction on the devices."""
    leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
    return jnp.isfinite(loss) & jnp.all(jnp.stack(leaves))


def _reduce_steps(metrics):
    """The metrics of steps_per_call scanned steps: means, but the finiteness report counts and
    keeps the first step."""
    reducers = {NONFINITE_STEPS: jnp.sum, FIRST_NONFINITE_STEP: jnp.min}
    return {k: reducers.get(k, jnp.mean)(v) for k, v in metrics.items()}


def accumulate_gradient(gradient, batch, rng, microbatches, mesh):
    """gradient(rows, key) -> (grads, metrics) over the whole batch, computed `microbatches`
    slices at a time (lax.scan) and averaged: the step of the full batch in about 1/microbatches
    of its activation memory (the official PyTorch code's `microbatch`, EDM's `batch_gpu`).

    Slice j holds every microbatches-th row of each device's rows, so every slice stays spread
    over all devices, and draws its noise from fold_in(key, j). As every loss is a mean over
    examples, the average of the slices' gradients is the gradient of the batch mean; only the
    random draws differ from a step without slices. One slice is the plain call, bit for bit.
    """
    if microbatches == 1:
        return gradient(batch, rng)
    slices = NamedSharding(mesh, P(None, *batch_sharding(mesh).spec))  # axis 1: the rows

    def split(x):  # [B, ...] -> [microbatches, B / microbatches, ...], rows j::microbatches
        x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), slices)

    def add_slice(total, inputs):
        j, rows = inputs
        grads, metrics = gradient(rows, jax.random.fold_in(rng, j))
        return jax.tree.map(jnp.add, total, grads), metrics

    first_grads = jax.eval_shape(gradient, jax.tree.map(lambda x: x[::microbatches], batch), rng)[0]
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first_grads)
    total, metrics = jax.lax.scan(
        add_slice, zeros, (jnp.arange(microbatches), jax.tree.map(split, batch))
    )
    return (
        jax.tree.map(lambda g: g / microbatches, total),
        jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics),
    )


# --------------------------------------------------------------------------- samples
def make_sample_fn(config, net):
    """jit-compiled (params, step) -> uint8 sample grid images from a fixed noise (comparable
    over time), sampled as the run's method does: one step for consistency models, EDM's
    sampler with sample.edm_steps for a diffusion teacher, the steps a PD student has learned
    by `step`."""
    n = config.train.num_sample_images
    shape = (n, config.data.image_size, config.data.image_size, config.data.num_channels)
    z = jax.random.normal(jax.random.PRNGKey(config.train.sample_seed), shape)
    labels = (jnp.arange(n) % config.model.num_classes) if config.model.num_classes > 0 else None
    method, kc, sample_c = methods.of(config), config.karras, config.sample
    scalings = dict(karras.grid(kc), sigma_data=kc.sigma_data)
    sampler = sampling.sampler_for(
        method.sampler,
        sigmas=(kc.sigma_max,),
        edm_steps=sample_c.edm_steps,
        edm_solver=sample_c.edm_solver,
        clip_denoised=sample_c.get("clip_denoised"),
    )

    def sample(params, step):
        # A PD student's steps follow its stage: traced, so one program serves every stage.
        learned = method.learned_steps(config, step)
        return data.to_uint8(sampler(net, params, z, labels, None, learned=learned, **scalings))

    return jax.jit(sample)


# --------------------------------------------------------------------------- the loop
class _StopRequest:
    """Whether to save and stop before num_steps: SIGTERM, what schedulers send before they kill
    a job. One process: a Python handler sets a flag. Several: JAX's pre-emption service notices
    SIGTERM on any of them (its own handler, so none is installed here) and every process reaches
    the sync point at the same call of the train step, so all save the same step and exit."""

    def __init__(self, first_call):
        self.call, self.raised = first_call, False
        self._previous = None
        if not distributed.is_multiprocess():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.raised = True

    def __call__(self):
        """Asked once per call of the train step, with consecutive ids on every process."""
        self.call += 1
        if distributed.is_multiprocess():
            return distributed.reached_preemption_sync_point(self.call)
        return self.raised

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class NonFiniteError(FloatingPointError):
    """The loss or gradients stopped being finite (train.nonfinite=stop)."""


class _NonfiniteGuard:
    """Keeps the calls' finiteness reports (device scalars: no host sync per step); `check`
    reads them at log and save boundaries: with train.nonfinite=stop a non-finite step is an
    error before anything is saved, with skip the count of skipped steps is logged."""

    def __init__(self, mode):
        self.mode, self.count, self.reports = mode, 0, []

    def add(self, metrics):
        """Takes the report out of a call's metrics."""
        self.reports.append((metrics.pop(NONFINITE_STEPS), metrics.pop(FIRST_NONFINITE_STEP)))

    def check(self, ckpt):
        """{"skipped_steps": total} (skip), or NonFiniteError naming the step and the newest
        good checkpoint (stop); every saved checkpoint is good, as none is saved after this
        fails."""
        reports, self.reports = jax.device_get(self.reports), []
        new = sum(int(count) for count, _ in reports)
        first = min((int(step) for _, step in reports), default=NO_STEP)
        self.count += new
        if self.mode == "skip" or new == 0:
            return {"skipped_steps": self.count} if self.mode == "skip" else {}
        latest = ckpt.latest_step()
        newest = (
            f"the newest checkpoint, {ckpt.directory / str(latest)} (step {latest}), is good"
            if latest is not None
            else "no checkpoint was saved yet"
        )
        raise NonFiniteError(
            f"The loss or the gradients are not finite at step {first} ({new} such steps "
            f"since the last check): stopped without saving; {newest}. Resume with a smaller "
            "optim.lr or optim.grad_clip, or set --config.train.nonfinite=skip to drop such "
            "updates."
        )


def validate_config(config):
    """One clear error for settings the loop cannot honour, before anything is read or
    compiled: config_checks' checks of every field, then those of the devices and the method."""
    config_checks.check_settings(config)
    tc = config.train
    check_fsdp(fsdp_size(config), jax.device_count())
    if tc.batch_size % jax.device_count():
        raise ValueError(
            f"train.batch_size={tc.batch_size} is not divisible by the "
            f"{jax.device_count()} devices."
        )
    if tc.steps_per_call < 1:
        raise ValueError(f"train.steps_per_call={tc.steps_per_call} must be at least 1.")
    if tc.microbatches < 1 or tc.batch_size % (tc.microbatches * jax.device_count()):
        raise ValueError(
            f"train.microbatches={tc.microbatches} must be at least 1 and divide "
            f"the {tc.batch_size // jax.device_count()} rows of the batch each of "
            f"the {jax.device_count()} devices holds "
            f"(train.batch_size={tc.batch_size})."
        )
    for name, least in (
        ("num_steps", 1),
        ("log_every", 1),
        ("save_every", 1),
        ("sample_every", 0),
        ("fid_every", 0),
    ):
        value = getattr(tc, name)
        if value < least or value % tc.steps_per_call:
            raise ValueError(
                f"train.{name}={value} must be a multiple of "
                f"train.steps_per_call={tc.steps_per_call} and at least {least}."
            )
    methods.of(config).check_config(config)


def check_inputs(config, workdir):
    """What the run reads besides its data, checked without loading it: the workdir is a folder
    (or absent), the teacher run has a config and a checkpoint, the LPIPS weights file exists."""
    root = epath.Path(workdir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--workdir={workdir} is a file; give a folder (new or a run's).")
    method = methods.of(config)
    if method.uses_teacher(config):
        try:
            teacher_config = teacher.check_teacher(config.teacher)
        except teacher.TeacherError as e:
            raise ValueError(str(e)) from e
        if method.starts_from_teacher(config):
            _check_same_function(config, teacher_config)
    distance = config.loss.distance if methods.of(config).uses_loss_distance else None
    if distance == "lpips":
        lpips.check_weights_path(config.loss.lpips_vgg_path)


# Model fields that change what a network computes without changing its parameters' shapes
# (with the value a config without the field means): a student started from a teacher's
# weights must share them.
SAME_SHAPE_MODEL_FIELDS = {"noise_conditioning": "log_sigma"}


def _check_same_function(config, teacher_config):
    for field, default in SAME_SHAPE_MODEL_FIELDS.items():
        student = config.model.get(field, default)
        teacher_value = teacher_config.model.get(field, default)
        if student != teacher_value:
            raise ValueError(
                f"The student starts from the teacher's weights, but its model.{field}="
                f"{student!r} differs from the teacher's {teacher_value!r}: set "
                f"--config.model.{field}={teacher_value} or --config.teacher.init_student=False."
            )


def load_frozen_networks(config, mesh):
    """(teacher network or None, frozen) where frozen holds the parameters the loss reads but
    never trains: "teacher" (the EDM teacher of CD, PD and sCD, the starting point of ECT and
    of sCT when it has one) and "lpips" (the LPIPS VGG16), sharded over `mesh` as the state
    is (`train_state.shardings`: replicated with fsdp 1)."""
    method, teacher_net, frozen = methods.of(config), None, {}
    if method.uses_teacher(config):
        teacher_net, _, frozen["teacher"] = teacher.load_teacher(config.teacher, mesh)
        logging.info("Teacher: %s", config.teacher.workdir)
    if method.uses_loss_distance and config.loss.distance == "lpips":
        params = lpips.load_lpips_params(config.loss.lpips_vgg_path)
        frozen["lpips"] = jax.device_put(params, shardings(params, mesh))
    return teacher_net, frozen


def initial_student(config, net, frozen):
    """θ to start from instead of the initialiser, or None: the teacher's weights where the
    method starts from them (`Method.student_start`). A method whose loss does not read the
    teacher (PD keeps it in the state as θ⁻; ECT and sCT never read it) takes it out of
    `frozen`. sCM's uncertainty head starts fresh beside the teacher's weights."""
    method = methods.of(config)
    if "teacher" not in frozen or not method.starts_from_teacher(config):
        return None
    params = frozen["teacher"] if method.distills else frozen.pop("teacher")
    _check_same_architecture(config, net, params)
    return with_uncertainty_head(config, params, jax.random.PRNGKey(config.train.seed))


def _check_same_architecture(config, net, params):
    """Starting the student from the teacher's weights needs the same parameter shapes."""
    expected = jax.eval_shape(lambda: init_params(config, net, jax.random.PRNGKey(0)))
    expected, _ = uncertainty.split(expected)
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
    if shapes(expected) != shapes(params):
        optional = methods.of(config).student_start == methods.base.OPTIONAL
        remedy = " or set --config.teacher.init_student=False" if optional else ""
        raise ValueError(
            f"The student starts from the teacher's weights, but config.model builds "
            f"a network whose parameters differ from the teacher's; match the "
            f"teacher's model{remedy}."
        )


def data_meta(config):
    """What the step-indexed data order depends on; stored with each checkpoint."""
    return {"data_seed": int(config.data.seed), "batch_size": int(config.train.batch_size)}


def train_and_evaluate(config, workdir, hooks=()):
    """Train config.method for config.train.num_steps, resuming from workdir if it has a state.

    Everything is checked before anything is written: the settings, the data, the teacher run
    and weight files, the workdir's lock (one run per workdir) and, when resuming, the config
    the checkpoints were trained with.

    hooks: (every, fn) pairs; fn(step, state) -> {name: scalar} runs every `every` steps and
    its scalars are logged (launch.py adds the FID evaluator this way, so that the trainer does
    not depend on the evaluator).
    """
    validate_config(config)
    check_inputs(config, workdir)
    dataset = data.load_split(config.data, num_classes=config.model.num_classes)
    with workdir_lock.acquire(workdir):
        saved = config_checks.read_saved_config(workdir)
        changes = config_checks.check_resume(saved, config) if saved else {}
        mesh = config_mesh(config)
        net = models.create_model(config.model)
        tx, lr_schedule = optim.make_optimizer(config.optim)
        teacher_net, frozen = load_frozen_networks(config, mesh)
        state = init_train_state(
            config, net, tx, mesh, initial_params=initial_student(config, net, frozen)
        )
        logging.info(
            "%s: %s parameters, %s",
            config.model.name,
            f"{count_params(state.params):,}",
            distributed.describe(),
        )
        ckpt = checkpoint.Checkpointer(
            epath.Path(workdir) / "checkpoints", config.train.keep_checkpoints
        )
        try:
            state = _resume(config, ckpt, state)
            # Written once the state is known to fit, so a mistaken command cannot overwrite
            # the config of the run it failed to resume.
            if distributed.is_writer():
                config_checks.record_config(workdir, config, changes, int(state.step))
            step_fn = make_train_step(config, net, tx, lr_schedule, mesh, teacher_net)
            train_step = lambda state, batch: step_fn(state, batch, frozen)
            sample_fn = make_sample_fn(config, net) if config.train.sample_every else None
            writer = metric_logging.create_writer(workdir, tensorboard=config.train.tensorboard)
            writer.write_config(config, step=int(state.step))
            try:
                _loop(
                    config,
                    workdir,
                    state,
                    dataset,
                    train_step,
                    sample_fn,
                    ckpt,
                    writer,
                    mesh,
                    hooks,
                )
            finally:
                writer.close()
        finally:
            ckpt.wait()
            ckpt.close()


def _resume(config, ckpt, state):
    """The newest good checkpoint's state, or `state` for a new run."""
    restored = ckpt.restore(state)
    if restored is None:
        return state
    state, meta = restored
    if meta != data_meta(config):
        logging.warning(
            "Resuming with data settings %s, the checkpoint has %s: the batch "
            "order will differ from the interrupted run.",
            data_meta(config),
            meta,
        )
    logging.info("Resumed from step %d.", int(state.step))
    return state


def _loop(config, workdir, state, dataset, train_step, sample_fn, ckpt, writer, mesh, hooks):
    tc = config.train
    start = int(state.step)
    if start >= tc.num_steps:
        logging.info("Step %d already reached num_steps=%d: nothing to train.", start, tc.num_steps)
        return
    stop_requested = _StopRequest(first_call=start // tc.steps_per_call)
    guard = _NonfiniteGuard(tc.get("nonfinite", "stop"))
    iterator = input_pipeline.TrainIterator(
        dataset,
        tc.batch_size,
        batch_sharding(mesh, tc.steps_per_call),
        start_step=start,
        seed=config.data.seed,
        random_flip=config.data.random_flip,
        prefetch=config.data.prefetch,
        steps_per_call=tc.steps_per_call,
    )
    bar = progress.Progress(tc.num_steps, "step", "train", initial=start)
    throughput = _Throughput(start, tc.batch_size)
    try:
        for step, batch in iterator:
            state, metrics = train_step(state, batch)
            guard.add(metrics)
            step += tc.steps_per_call
            if not throughput.compiled:
                throughput.after_first_call(step, metrics, bar)
            bar.update(tc.steps_per_call)
            preempted = step < tc.num_steps and stop_requested()
            stop = preempted or step >= tc.num_steps
            save = stop or step % tc.save_every == 0
            if save or step % tc.log_every == 0:
                checked = guard.check(ckpt)  # Before any save: a non-finite state is never saved.
                if step % tc.log_every == 0 or step == tc.num_steps:
                    _log(writer, step, metrics | checked, throughput, bar)
            if sample_fn is not None and step % tc.sample_every == 0:
                method = methods.of(config)
                _save_samples(sample_fn, state, workdir, step, tc.ema_rates[0], writer, method)
            for every, hook in hooks:
                if step % every == 0:
                    writer.write_scalars(step, hook(step, state))
                    writer.flush()
            if save:
                ckpt.save(step, state, data_meta(config))
            if preempted:
                logging.warning("Pre-empted: saved the checkpoint of step %d and stopping.", step)
            if stop:
                break
    finally:
        bar.close()
        iterator.close()
        stop_requested.restore()


class _Throughput:
    """Steps and images per second between log points. The first call of the train step
    compiles it: its time is logged apart and kept out of the rates."""

    def __init__(self, start_step, batch_size):
        self.batch_size = batch_size
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.compiled = False

    def after_first_call(self, step, metrics, bar):
        """Wait for the first call (compilation and one step), log its time, restart the rates."""
        jax.block_until_ready(metrics)
        now = time.perf_counter()
        logging.info("Compiled the train step and ran it once in %.1f s.", now - self.last_time)
        self.last_step, self.last_time, self.compiled = step, now, True
        bar.restart_clock()

    def rates(self, step):
        now = time.perf_counter()
        steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return {"steps_per_sec": steps_per_sec, "images_per_sec": steps_per_sec * self.batch_size}


def _log(writer, step, metrics, throughput, bar):
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}  # Syncs the device.
    if step > throughput.last_step:  # No rate for a log point right after the first call.
        scalars.update(throughput.rates(step))
    writer.write_scalars(step, scalars)
    writer.flush()
    bar.update(0, loss=f"{scalars['loss']:.4g}")


def _save_samples(sample_fn, state, workdir, step, ema_rate, writer, method):
    images = jax.device_get(sample_fn(state.ema_params[ema_key(ema_rate)], state.step))
    if distributed.is_writer():
        path = epath.Path(workdir) / "samples" / f"step_{step:08d}.png"
        caption = f"step {step} · EMA {ema_rate} · {method.sampler} sampler"
        grid = metric_logging.save_image_grid(images, path, caption=caption)
        writer.write_images(step, {f"samples/ema_{ema_rate}": grid})
        writer.flush()
        logging.info("Wrote %s (one EMA %s sample grid).", path, ema_rate)
