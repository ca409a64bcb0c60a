"""What one checkpoint save costs: the time it blocks training and the whole save, with orbax's
own jax.Array handler (every replicated array split among its replicas) and with cm_jax's
(checkpoint.MIN_REPLICA_SLICE_BYTES: only pieces of 1 MiB or more are split); then what one
verified restore of it costs, and the read of orbax's metadata that a restore skips when the
checkpoint's digest fits the state.

    python benchmarks/checkpoint_save.py --devices 8 --saves 4 --restores 4

Builds the train state of `configs/cifar10_ict.py:test` with a two-level NCSN++ (the `:test`
network until 2026-12-02: 48,763 parameters, nf 8, ch_mult (1, 2), attention at 8; its state
holds 946 arrays: θ, θ⁻, two EMAs, Adam's moments) replicated over `--devices` fake CPU devices,
then saves it `--saves` times with each handler into a fresh folder and prints, per save, the
blocking time (`Checkpointer.save` returning) and the total (after `wait()`).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time_saves(state, folder, saves):
    from cm_jax import checkpoint

    manager = checkpoint.Checkpointer(folder, keep=2)
    rows = []
    for step in range(saves):
        start = time.perf_counter()
        manager.save(step, state, {"step": step})
        blocked = time.perf_counter() - start
        manager.wait()
        rows.append((blocked, time.perf_counter() - start))
    manager.close()
    return rows


def _time_restores(state, folder, restores):
    """(restore, orbax metadata read) seconds, `restores` times."""
    from cm_jax import checkpoint

    manager = checkpoint.Checkpointer(folder, keep=2)
    step = manager.latest_step()
    rows = []
    for _ in range(restores):
        start = time.perf_counter()
        manager.restore(state)
        restored = time.perf_counter() - start
        start = time.perf_counter()
        manager._stored_layout(step)  # pylint: disable=protected-access
        rows.append((restored, time.perf_counter() - start))
    manager.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--restores", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax
    import orbax.checkpoint as ocp

    # Importing cm_jax.checkpoint registers its handler, so `ours` is read after that import.
    from cm_jax import checkpoint, models, optim, train_state
    from configs import cifar10_ict

    config = cifar10_ict.get_config("test")
    config.model.update(ch_mult=(1, 2), attn_resolutions=(8,))  # The figures' network.
    mesh = train_state.create_mesh(jax.devices())
    net = models.create_model(config.model)
    tx, _ = optim.make_optimizer(config.optim)
    state = train_state.init_train_state(config, net, tx, mesh)
    print(f"{len(jax.tree.leaves(state))} arrays on {args.devices} devices")

    ours = ocp.type_handlers.get_type_handler(jax.Array)
    min_slice = getattr(ours, "_min_slice_bytes_for_replica_parallel", None)
    if min_slice != checkpoint.MIN_REPLICA_SLICE_BYTES:
        sys.exit(f"the registered jax.Array handler is not cm_jax's (min slice {min_slice})")
    orbax_default = ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(ours, "_array_metadata_store", None)
    )
    with tempfile.TemporaryDirectory() as root:
        for name, handler in (("orbax default", orbax_default), ("cm_jax", ours)):
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
            rows = _time_saves(state, os.path.join(root, name.replace(" ", "_")), args.saves)
            cells = ", ".join(f"{b:.2f}/{t:.2f}" for b, t in rows)
            print(f"{name:>13}: blocked/total s per save: {cells}")
        rows = _time_restores(state, os.path.join(root, "cm_jax"), args.restores)
        cells = ", ".join(f"{r:.2f}/{m:.2f}" for r, m in rows)
        print(f"restore/orbax metadata read s: {cells}")


if __name__ == "__main__":
    main()
