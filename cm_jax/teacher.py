"""The frozen teacher of consistency (and progressive) distillation: an EDM run's evaluation
EMA, read from the workdir that trained it (its config.json says which network to build), or
from one of its checkpoint folders (`<workdir>/checkpoints/<step>`).
"""

import jax

from cm_jax import methods, runs


class TeacherError(ValueError):
    """The configured teacher cannot be used; names the problem."""


def check_teacher(teacher_config):
    """The teacher run's config; TeacherError unless teacher.workdir is a trained EDM run with
    the asked checkpoint. Its config and checkpoint list are read, nothing is loaded."""
    try:
        workdir, step = runs.split_checkpoint_path(teacher_config.workdir, teacher_config.step)
        run_config = runs.read_run_config(workdir)
        runs.check_checkpoint(workdir, step)
    except runs.RunError as e:
        raise TeacherError(f"teacher.workdir: {e}") from e
    _check_teaches(workdir, run_config)
    return run_config


def _check_teaches(workdir, run_config):
    if not methods.get(run_config.method).teaches:
        raise TeacherError(
            f"teacher.workdir={workdir!r} trained method {run_config.method!r}; "
            "the teacher of CD, PD, ECT or sCM must be an EDM diffusion model "
            "(method 'edm')."
        )


def load_teacher(teacher_config, mesh):
    """(network, the run's config, params) of the teacher's EMA at `teacher.ema_rate` (0: its
    first), sharded over `mesh` (the student's: `train_state.shardings` by its fsdp axis,
    whatever mesh the teacher was trained on). The whole teacher state is restored, then all
    but that EMA is dropped."""
    try:
        workdir, step = runs.split_checkpoint_path(teacher_config.workdir, teacher_config.step)
        run_config, net, state = runs.restore_run(workdir, mesh, step)
        params = runs.ema_params(run_config, state, teacher_config.ema_rate)
    except runs.RunError as e:
        raise TeacherError(f"teacher.workdir: {e}") from e
    _check_teaches(workdir, run_config)
    del state
    return net, run_config, jax.block_until_ready(params)
