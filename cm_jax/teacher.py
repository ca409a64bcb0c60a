"""The frozen teacher of consistency distillation: an EDM run's evaluation EMA, read from the
workdir that trained it (its config.json says which network to build).
"""
import json
import os

import jax
from ml_collections import config_dict

from cm_jax import checkpoint, models, optim
from cm_jax.train_state import ema_key, init_train_state


class TeacherError(ValueError):
    """The configured teacher cannot be used; names the problem."""


def read_run_config(workdir):
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise TeacherError(f"teacher.workdir={workdir!r} has no config.json: give the --workdir "
                           f"of a finished `method=edm` run.")
    with open(path, encoding="utf-8") as f:
        return config_dict.ConfigDict(json.load(f))


def load_teacher(teacher_config, mesh):
    """(network, params) of the teacher's EMA at `teacher.ema_rate` (0: its first), replicated
    over `mesh`. The whole teacher state is restored, then all but that EMA is dropped."""
    workdir = teacher_config.workdir
    run_config = read_run_config(workdir)
    if run_config.method != "edm":
        raise TeacherError(f"teacher.workdir={workdir!r} trained method {run_config.method!r}; "
                           f"a CD teacher must be an EDM diffusion model (method 'edm').")
    net = models.create_model(run_config.model)
    tx, _ = optim.make_optimizer(run_config.optim)
    template = init_train_state(run_config, net, tx, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        step = teacher_config.step or None
        restored = ckpt.restore(template, step)
    finally:
        ckpt.close()
    if restored is None:
        raise TeacherError(f"teacher.workdir={workdir!r} has no checkpoint yet.")
    state, _ = restored
    rate = teacher_config.ema_rate or run_config.train.ema_rates[0]
    if ema_key(rate) not in state.ema_params:
        raise TeacherError(f"The teacher has no EMA with rate {rate}; it has "
                           f"{list(run_config.train.ema_rates)}.")
    params = state.ema_params[ema_key(rate)]
    del state
    return net, run_config, jax.block_until_ready(params)
