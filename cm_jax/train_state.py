"""The train state and where it lives: a 1-D device mesh, batches split over "data", the state
replicated. Shared by the trainer and by whatever loads a trained state (a teacher, a sampler).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cm_jax import methods
from cm_jax.models import uncertainty


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken
    params: Any  # θ
    target_params: Any  # θ⁻, None for methods without a target network
    ema_params: dict  # {ema_key(r): θ_r} evaluation EMAs
    opt_state: Any
    rng: jax.Array  # base key; step k draws from fold_in(rng, k)


def ema_key(rate):
    """'0.9999' -> '0_9999': a key that is also a safe checkpoint path component."""
    return str(rate).replace(".", "_")


def ema_update(average, new, rate):
    """r·average + (1 − r)·new, leaf by leaf."""
    return jax.tree.map(lambda a, n: rate * a + (1.0 - rate) * n, average, new)


def create_mesh(devices=None):
    """All devices (of all hosts), or the given ones, on one data-parallel axis "data"."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh):
    return NamedSharding(mesh, P())


def batch_sharding(mesh, steps_per_call=1):
    """Batches split over "data" (axis 1 when several steps are stacked for lax.scan)."""
    return NamedSharding(mesh, P("data") if steps_per_call == 1 else P(None, "data"))


def init_params(config, net, rng):
    """The network's parameters from its initialiser (traceable), and for sCM the
    uncertainty head's beside them."""
    size, channels = config.data.image_size, config.data.num_channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if config.model.num_classes > 0 else None
    params = net.init({"params": rng}, x, jnp.zeros((1,)), labels, train=False)["params"]
    return with_uncertainty_head(config, params, jax.random.fold_in(rng, 1))


def with_uncertainty_head(config, network_params, rng):
    """network_params, with a fresh uncertainty head beside them where the method learns one."""
    if not methods.of(config).has_uncertainty_head:
        return network_params
    head = uncertainty.init_params(config.scm.uncertainty_channels, rng)
    return uncertainty.attach(network_params, head)


def _state_initialiser(config, net, tx):
    """(rng, initial params or None) -> a fresh TrainState (traceable)."""
    # θ⁻ only for methods whose loss reads it (PD's is its teacher, replaced every stage).
    has_target = methods.of(config).has_target_network

    def init(rng, initial):
        params_rng, state_rng = jax.random.split(rng)
        params = init_params(config, net, params_rng) if initial is None else initial
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            target_params=params if has_target else None,
            ema_params={ema_key(r): params for r in config.train.ema_rates},
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return init


def init_train_state(config, net, tx, mesh, initial_params=None):
    """A fresh state on the devices, replicated over the mesh.

    initial_params: start θ (and θ⁻ and the EMAs) from these instead of the initialiser, as
    consistency distillation does from its teacher.
    """
    init = _state_initialiser(config, net, tx)
    return jax.jit(init, out_shardings=replicated(mesh))(
        jax.random.PRNGKey(config.train.seed), initial_params
    )


def abstract_train_state(config, net, tx, mesh):
    """The shapes, dtypes and (replicated) shardings of a fresh state, computing nothing: the
    restore target of a trained run, which needs no initialised weights nor their compilation."""
    init = _state_initialiser(config, net, tx)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(config.train.seed), None)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), shapes
    )


def count_params(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
