"""The train state and where it lives: a device mesh with axes ("data", "fsdp"), batches split
over both, the state's large arrays split over "fsdp" (`shardings`, fully sharded data
parallelism; `mesh.fsdp=1`, the default, replicates everything). Shared by the trainer and by
whatever loads a trained state (a teacher, a sampler).
"""

import math
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


# Arrays with fewer elements stay replicated under FSDP (biases, norms, the optimizer's count,
# the rng key): splitting them saves little and costs a collective each.
FSDP_MIN_SIZE = 2**14
MESH_AXES = ("data", "fsdp")


def fsdp_size(config):
    """config.mesh.fsdp: how many devices share one copy of the state (1 when the config, e.g.
    an older run's, has no mesh section)."""
    mesh = config.get("mesh", None)
    return int(mesh.get("fsdp", 1)) if mesh is not None else 1


def check_fsdp(fsdp, num_devices):
    """ValueError unless fsdp is at least 1 and divides the device count."""
    if fsdp < 1 or num_devices % fsdp:
        raise ValueError(
            f"mesh.fsdp={fsdp} must be at least 1 and divide the {num_devices} devices "
            f"(the data axis takes the rest: {num_devices} = data × fsdp); use one of "
            f"{[k for k in range(1, num_devices + 1) if num_devices % k == 0]}."
        )


def create_mesh(devices=None, fsdp=1):
    """All devices (of all hosts), or the given ones, in order on a (data, fsdp) mesh of shape
    (len(devices) / fsdp, fsdp): consecutive devices share one copy of the state."""
    devices = jax.devices() if devices is None else list(devices)
    check_fsdp(fsdp, len(devices))
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp), MESH_AXES, axis_types=(auto, auto), devices=devices
    )


def config_mesh(config, devices=None):
    """The mesh `config.mesh` asks for, on `devices` (None: all)."""
    return create_mesh(devices, fsdp_size(config))


def mesh_fsdp(mesh):
    """The size of the mesh's fsdp axis (1 for a mesh without one)."""
    return dict(mesh.shape).get("fsdp", 1)


def _batch_axes(mesh):
    """The mesh axes a batch is split over: every device takes its own rows."""
    axes = tuple(a for a in MESH_AXES if a in mesh.axis_names)
    return axes[0] if len(axes) == 1 else axes


def replicated(mesh):
    return NamedSharding(mesh, P())


def batch_sharding(mesh, steps_per_call=1):
    """Batches split over all devices, ("data", "fsdp") (axis 1 when several steps are stacked
    for lax.scan): device i of jax.devices() holds the i-th block of rows."""
    axes = _batch_axes(mesh)
    return NamedSharding(mesh, P(axes) if steps_per_call == 1 else P(None, axes))


def fsdp_spec(shape, fsdp):
    """Where an array of `shape` lives on a mesh whose fsdp axis has `fsdp` devices: split over
    "fsdp" along its largest dimension divisible by fsdp (the last of equal ones), or replicated
    (P()) when fsdp is 1, the array has fewer than FSDP_MIN_SIZE elements, or no dimension
    divides."""
    shape = tuple(shape)
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*([None] * axis), "fsdp")


def shardings(tree, mesh):
    """The sharding of every array of `tree` (arrays or ShapeDtypeStructs: only shapes are
    read) on `mesh` by `fsdp_spec`: the one rule for the train state, its restore target and
    the frozen teacher and LPIPS weights."""
    fsdp = mesh_fsdp(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def shard_shape(shape, fsdp):
    """The shape one device holds of an array of `shape` under `fsdp_spec`: PartitionSpec
    arithmetic, needing no mesh (for the memory table of meshes larger than this machine's)."""
    spec = tuple(fsdp_spec(shape, fsdp))
    spec += (None,) * (len(shape) - len(spec))
    return tuple(size // fsdp if axis == "fsdp" else size for size, axis in zip(shape, spec))


def per_device_bytes(tree, fsdp):
    """Bytes of `tree` (arrays or ShapeDtypeStructs) that each device holds under `fsdp_spec`."""
    return sum(
        math.prod(shard_shape(np.shape(x), fsdp)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


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


def state_shardings(config, net, tx, mesh):
    """The shardings of a fresh state's arrays over `mesh` (`shardings` on the shapes of
    `jax.eval_shape` of the initialiser): with fsdp 1 the one replicated sharding, a prefix of
    any state, without tracing the initialiser."""
    if mesh_fsdp(mesh) == 1:
        return replicated(mesh)
    return shardings(state_shapes(config, net, tx), mesh)


def state_shapes(config, net, tx):
    """The ShapeDtypeStructs of a fresh state (`jax.eval_shape`: nothing is computed)."""
    init = _state_initialiser(config, net, tx)
    return jax.eval_shape(init, jax.random.PRNGKey(config.train.seed), None)


def init_train_state(config, net, tx, mesh, initial_params=None):
    """A fresh state on the devices, sharded over the mesh by `shardings` (replicated with
    fsdp 1).

    initial_params: start θ (and θ⁻ and the EMAs) from these instead of the initialiser, as
    consistency distillation does from its teacher.
    """
    init = _state_initialiser(config, net, tx)
    return jax.jit(init, out_shardings=state_shardings(config, net, tx, mesh))(
        jax.random.PRNGKey(config.train.seed), initial_params
    )


def abstract_train_state(config, net, tx, mesh):
    """The shapes, dtypes and shardings (`shardings` over `mesh`) of a fresh state, computing
    nothing: the restore target of a trained run, which needs no initialised weights nor their
    compilation."""
    shapes = state_shapes(config, net, tx)
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        shardings(shapes, mesh),
    )


def count_params(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
