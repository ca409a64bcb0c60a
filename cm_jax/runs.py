"""A finished (or running) training run, read back from its workdir: the config it wrote and
the state of one of its checkpoints. Teachers, samplers and evaluators start here.
"""

import json
import math
import os

import jax
from absl import logging
from etils import epath
from ml_collections import config_dict

from cm_jax import checkpoint, models, optim
from cm_jax.train_state import abstract_train_state, create_mesh, ema_key, fsdp_size


class RunError(ValueError):
    """A workdir that cannot serve as asked; the message names the problem."""


def split_checkpoint_path(path, step=None):
    """(workdir, step) for a run's workdir or one of its checkpoints, `<workdir>/checkpoints/<step>`
    (what a user finds on disk and may paste); `step` (None or 0: the newest) must then agree."""
    parent, name = os.path.split(os.path.normpath(path))
    if os.path.basename(parent) != "checkpoints" or not name.isdigit():
        return path, step
    if step and int(step) != int(name):
        raise RunError(
            f"{path!r} is the checkpoint of step {name}, but step {step} was asked "
            f"for: give the run's workdir, or leave the step at 0."
        )
    return os.path.dirname(parent), int(name)


def read_run_config(workdir):
    """The config.json a run wrote into its workdir."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise RunError(f"{workdir!r} has no config.json: give the --workdir of a training run.")
    try:
        return config_dict.ConfigDict(json.loads(path.read_text()))
    except ValueError as e:
        raise RunError(f"{path} is not a run's config ({e}).") from e


def _checkpoints(workdir):
    """A read-only view of the run's checkpoints: a reader never moves, saves nor deletes."""
    return checkpoint.Checkpointer(epath.Path(workdir) / "checkpoints", read_only=True)


def check_checkpoint(workdir, step=None):
    """RunError unless the run has checkpoint `step` (None or 0: any)."""
    folder = epath.Path(workdir) / "checkpoints"
    if not folder.is_dir():
        raise RunError(f"{workdir!r} has no checkpoint yet.")
    ckpt = _checkpoints(workdir)
    try:
        available = ckpt.all_steps()
    finally:
        ckpt.close()
    if not available:
        raise RunError(f"{workdir!r} has no checkpoint yet.")
    if step and step not in available:
        raise RunError(f"{workdir!r} has no checkpoint at step {step}; it has {available}.")


def run_mesh(config, devices=None):
    """The mesh of a run's own `config.mesh` (fsdp 1, replicated, for a run without one) on
    `devices` (None: all). Where the run's fsdp does not divide their number (a run trained
    with fsdp 8, read on 1 device), the largest common divisor of the two."""
    devices = jax.devices() if devices is None else list(devices)
    fsdp = math.gcd(fsdp_size(config), len(devices))
    if fsdp != fsdp_size(config):
        logging.info(
            "The run's mesh.fsdp=%d does not divide the %d devices: reading it with fsdp %d.",
            fsdp_size(config),
            len(devices),
            fsdp,
        )
    return create_mesh(devices, fsdp)


def restore_run(workdir, mesh=None, step=None):
    """(config, network, state) of the run's checkpoint `step` (None or 0: the newest good
    one). mesh: a Mesh to shard the state over (`train_state.shardings` by its fsdp axis: a
    training run's teacher lives on the run's mesh), or the devices to read it onto (None:
    all), on the mesh of the run's own config.mesh there (`run_mesh`). Checkpoints are global
    arrays: any mesh reads any checkpoint."""
    config = read_run_config(workdir)
    check_checkpoint(workdir, step)
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = run_mesh(config, mesh)
    net = models.create_model(config.model)
    tx, _ = optim.make_optimizer(config.optim)
    template = abstract_train_state(config, net, tx, mesh)
    ckpt = _checkpoints(workdir)
    try:
        restored = ckpt.restore(template, step or None)
    except checkpoint.CheckpointError as e:
        raise RunError(f"{workdir!r}: {e}") from e
    finally:
        ckpt.close()
    if restored is None:
        raise RunError(f"{workdir!r} has no checkpoint yet.")
    return config, net, restored[0]


def ema_params(config, state, rate=None):
    """The evaluation EMA with `rate` (None or 0: the run's first)."""
    rate = rate or config.train.ema_rates[0]
    if ema_key(rate) not in state.ema_params:
        raise RunError(
            f"The run has no EMA with rate {rate}; it has {list(config.train.ema_rates)}."
        )
    return state.ema_params[ema_key(rate)]
