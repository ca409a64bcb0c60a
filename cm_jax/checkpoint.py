"""Orbax checkpoints of the whole train state, with automatic resume.

`workdir/checkpoints/<step>/` holds two items: `state` (the TrainState pytree: params, θ⁻, the
eval EMAs, optimizer state, rng and step) and `meta` (JSON: what the data order depends on).
Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact and is never resumed from a partial one.
"""

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot serve this run. Nothing on disk is changed."""


def abstract_like(state):
    """Shapes, dtypes and shardings of `state` (arrays, or already ShapeDtypeStructs): the
    restore target.

    Restoring onto the current run's shardings is what lets a state saved on 8 devices be
    read on 1 (or the reverse).
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


class Checkpointer:
    """Save when the trainer asks, keep the newest `keep`, resume from the newest."""

    def __init__(self, directory, keep=3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self):
        return self._manager.latest_step()

    def all_steps(self):
        return sorted(self._manager.all_steps())

    def save(self, step, state, meta):
        """Start writing `state` at `step` in the background; `wait()` blocks until done."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def restore(self, template_state, step=None):
        """(state, meta) of `step` (default: the newest), or None when there is no checkpoint.

        `template_state` is a freshly initialised state, or its `abstract_train_state`, whose
        structure, shapes and shardings the restored one must take; a mismatch (a different
        model config, say) is one clear error.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(template_state)),
            meta=ocp.args.JsonRestore(),
        )
        path = os.path.join(self.directory, str(step))
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax raises many types; all mean "cannot use this checkpoint".
            raise CheckpointError(
                f"Cannot restore the checkpoint at {path}: it does not match this run's train "
                f"state (a different model, method or EMA config?) or is unreadable. It was left "
                f"untouched; use another --workdir or the config it was written with. "
                f"Cause: {type(e).__name__}: {e}"
            ) from e
        return restored.state, restored.meta

    def reached_preemption(self, step):
        """True on every host once any host got a pre-emption notice (multi-host TPU/GPU)."""
        return self._manager.reached_preemption(step)

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()
