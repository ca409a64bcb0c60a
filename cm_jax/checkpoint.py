"""Orbax checkpoints of the whole train state, verified on restore, with automatic resume.

`<directory>/<step>/` holds three items: `state` (the TrainState pytree: params, θ⁻, the eval
EMAs, optimizer state, rng and step), `meta` (JSON: what the data order depends on) and `digest`
(JSON: the shape, dtype and two 32-bit checksums of every array of `state`, keyed by its pytree
path). Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run
killed mid-save never leaves a partial one; the digest catches what happens to the files later
(a flipped bit, a truncated or deleted file, a second run writing into the same folder).

`restore` tries the checkpoints newest first. One that cannot be read, or whose arrays do not
match their digest, is moved aside to `<directory>/corrupt-<step>` (kept for inspection, never
listed nor deleted by orbax) and the previous one is tried. One that is readable but built for
another train state (a different model, method or EMA set) is not damaged: that is a
`CheckpointError` and nothing on disk changes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DIGEST_FORMAT = "cm_jax.checkpoint.digest/1"
CORRUPT_PREFIX = "corrupt-"
_ITEM_HANDLERS = {
    "state": ocp.StandardCheckpointHandler,
    "meta": ocp.JsonCheckpointHandler,
    "digest": ocp.JsonCheckpointHandler,
}
# Multiplying the position by an odd constant is a bijection mod 2^32: every position of an array
# (up to 2^32 values) gets its own weight, so two values that trade places change the sum.
_POSITION_MULTIPLIER = np.uint32(0x9E3779B1)
# On CPU and TPU orbax splits every replicated array among its replicas, each writing a piece:
# one eager slice per array and replica, compiled once per shape. A train state holds hundreds
# to thousands of small arrays (a bias, a norm scale), where that costs more than the write.
# A 48k-parameter state of 946 arrays on 8 CPU devices: a save blocked training 3.0-3.5 s (19 s
# the first time) and took 8 s in all; with pieces under this size written whole, 0.6-1.2 s and
# 3.3 s (benchmarks/checkpoint_save.py, BENCHMARKS.md).
# Arrays whose pieces reach it (a large model's kernels) are still written in parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_replica_parallel_for_large_arrays_only():
    """Replaces orbax's jax.Array handler by one with MIN_REPLICA_SLICE_BYTES, keeping its
    array-metadata store (where this orbax version has one)."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        array_metadata_store=getattr(default, "_array_metadata_store", None),
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


_use_replica_parallel_for_large_arrays_only()


class CheckpointError(RuntimeError):
    """No checkpoint can serve this run; the message names each one and why."""


class _Damaged(Exception):
    """This checkpoint cannot be read, or its arrays differ from their digest."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def abstract_like(state):
    """Shapes, dtypes and shardings of `state` (arrays, or already ShapeDtypeStructs): the
    restore target.

    Restoring onto the current run's shardings is what lets a state saved on 8 devices be
    read on 1 (or the reverse).
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


# --------------------------------------------------------------------------------- the digest
def leaf_name(path):
    """'params/Conv_0/kernel' for a pytree key path: the same for a TrainState and for the nested
    dicts and lists orbax stores it as."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, Sequence/FlattenedIndexKey
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def named_leaves(tree):
    """{leaf_name: leaf} of a pytree (None subtrees, such as an absent θ⁻, have no leaves)."""
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _bits_as_uint32(x):
    """The array's bit patterns as uint32 (8- and 16-bit values widened, 64-bit ones split in
    two), so that the sums see every bit and never round."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape):
    """The row-major index of every element, built axis by axis from iotas (not by flattening,
    which would gather an array sharded on a later axis)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride = stride * shape[axis] % 2**32
    return index


def _array_sums(x):
    """uint32[2]: the plain sum of the bits (one changed value always changes it) and the sum
    weighted by position (values that swap places change it), both wrapping mod 2^32."""
    bits = _bits_as_uint32(x)
    weights = _positions(bits.shape) * _POSITION_MULTIPLIER + np.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@functools.cache
def _sums_fn(devices):
    """`_array_sums` jitted for arrays on `devices` (None: host values), its result replicated
    there so that every process of a multi-process run can read it.

    One call per array: compiling a single function over all arrays of a train state (thousands)
    takes tens of seconds on CPU, while per array it compiles once per distinct shape and costs one
    dispatch (tens of microseconds on an accelerator) per array.
    """
    if devices is None:
        return jax.jit(_array_sums)
    mesh = Mesh(np.array(devices), ("all",))
    return jax.jit(_array_sums, out_shardings=NamedSharding(mesh, P()))


def _devices_of(x):
    if isinstance(x, jax.Array):
        return tuple(sorted(x.sharding.device_set, key=lambda d: d.id))
    return None


def _array_sums_of(x):
    """`_array_sums` of x, dispatched. The sum of an array split over several devices is a
    collective: it is waited for at once, because hundreds of them queued together (a sharded
    state's arrays) can starve the CPU backend's collectives past their fixed timeout, which
    aborts the process."""
    sums = _sums_fn(_devices_of(x))(x)
    if isinstance(x, jax.Array) and not x.sharding.is_fully_replicated:
        sums.block_until_ready()
    return sums


def state_digest(state):
    """{leaf_name: {"shape", "dtype", "sums": [plain, weighted]}} of every array of `state`.

    The sums are computed where the arrays live (sharded or replicated, on any number of
    processes); only two numbers per array come back to the host, and every process gets the
    same digest.
    """
    leaves = named_leaves(state)
    sums = [_array_sums_of(x) for x in leaves.values()]
    return {
        name: {
            "shape": list(np.shape(x)),
            "dtype": str(np.dtype(x.dtype)),
            "sums": [int(plain), int(weighted)],
        }
        for (name, x), (plain, weighted) in zip(leaves.items(), jax.device_get(sums))
    }


def digest_mismatches(expected, actual):
    """Names of the arrays whose digest differs (or that one side lacks), in a stable order."""
    return sorted(n for n in set(expected) | set(actual) if expected.get(n) != actual.get(n))


# -------------------------------------------------------------------- fit: structure and shapes
def _template_shapes(template):
    return {name: tuple(x.shape) for name, x in named_leaves(template).items()}


def _metadata_layout(tree_metadata):
    """{leaf_name: (shape, dtype)} of a saved state, from orbax's metadata (no data read)."""
    return {
        name: (tuple(m.shape), np.dtype(m.dtype))
        for name, m in named_leaves(tree_metadata.tree).items()
    }


def _digest_layout(digest):
    return {n: (tuple(d["shape"]), np.dtype(d["dtype"])) for n, d in digest.items()}


def _shape_differences(template_shapes, layout, limit=3):
    """A short description of how a saved layout differs from this run's state ('' if none)."""
    stored = {name: shape for name, (shape, _) in layout.items()}
    missing = sorted(set(template_shapes) - set(stored))
    extra = sorted(set(stored) - set(template_shapes))
    reshaped = sorted(
        f"{n} {stored[n]} vs {template_shapes[n]}"
        for n in set(stored) & set(template_shapes)
        if stored[n] != template_shapes[n]
    )
    parts = []
    for label, items in (
        ("not in the checkpoint", missing),
        ("only in the checkpoint", extra),
        ("shape saved vs this run", reshaped),
    ):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ helpers
def _root_cause(error):
    """The innermost exception of a chain: orbax wraps TensorStore's error, whose message says
    what is wrong with which file, in one whose first line does not."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _first_line(error):
    """'Type: first line' of the root cause: no TensorStore wall of detail."""
    error = _root_cause(error)
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_local(path):
    return "://" not in str(path)


def _as_directory(directory):
    """An epath.Path: `gs://bucket/run` stays as it is; a local path becomes absolute."""
    path = epath.Path(directory)
    return path.resolve() if _is_local(path) else path


def _all_processes_agree(ok):
    """True on every process iff `ok` is true on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _from_process_0(number):
    """Process 0's integer `number` on every process."""
    if jax.process_count() == 1:
        return number
    return int(multihost_utils.broadcast_one_to_all(np.int32(number)))


def _cast_like(state, template):
    """`state` with the template's dtypes, where a checkpoint stored others (it is read, and
    verified, as stored)."""

    def cast(x, t):
        if x.dtype == t.dtype:
            return x
        return jax.jit(lambda v: v.astype(t.dtype), out_shardings=t.sharding)(x)

    return jax.tree.map(cast, state, abstract_like(template))


class Checkpointer:
    """Save when the trainer asks, keep the newest `keep`, resume from the newest good one.

    After `restore`, `restored_step` is the step it used and `moved_aside` lists
    (step, new path, reason) for each damaged checkpoint it set aside (or, read-only, skipped).

    read_only: for readers of a run that may still be training (samplers, evaluators): nothing
    is created, saved, moved nor deleted; damaged checkpoints are only skipped.
    """

    def __init__(self, directory, keep=3, read_only=False):
        self.directory = _as_directory(directory)
        self.read_only = read_only
        self.restored_step = None
        self.moved_aside = []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only
        )
        handlers = {name: handler() for name, handler in _ITEM_HANDLERS.items()}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self):
        return self._manager.latest_step()

    def all_steps(self):
        return sorted(self._manager.all_steps())

    # ---------------------------------------------------------------------------- save
    def save(self, step, state, meta):
        """Start writing `state` at `step` in the background; `wait()` blocks until done.

        The digest is computed first, on the devices, from the state as it is now.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; it cannot save.")
        newer = [s for s in self.all_steps() if s > step]
        if newer:
            # Orbax keeps the highest steps: this one would be the first deleted.
            raise CheckpointError(
                f"Cannot save step {step} in {self.directory}: it already holds the later "
                f"steps {newer} (is another run writing into this workdir?)."
            )
        digest = {"format": DIGEST_FORMAT, "arrays": state_digest(state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            digest=ocp.args.JsonSave(digest),
        )
        self._manager.save(step, args=args, force=True)

    # ------------------------------------------------------------------------- restore
    def restore(self, template_state, step=None):
        """(state, meta) of the newest good checkpoint, or of `step`; None when there is none.

        `template_state` is a freshly initialised state, or its `abstract_train_state`, whose
        structure, shapes and shardings the restored one takes. Damaged checkpoints are moved
        aside (one warning each) and the previous one is tried; with `step` given there is no
        fallback.

        Raises CheckpointError when a checkpoint is built for another train state (nothing is
        changed on disk), or when every checkpoint tried is damaged (the error lists them).
        """
        self.restored_step, self.moved_aside = None, []
        if step is not None and step not in self.all_steps():
            raise CheckpointError(
                f"{self.directory} has no checkpoint at step {step}; it has {self.all_steps()}."
            )
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        for candidate in steps:
            try:
                state, meta = self._restore_verified(candidate, template_state)
            except _Damaged as damaged:
                self._set_aside(candidate, damaged.reason)
                continue
            self.restored_step = candidate
            return state, meta
        if self.moved_aside:
            raise CheckpointError(self._none_usable_message())
        return None

    def _restore_verified(self, step, template):
        digest, digest_error = self._read_digest(step)
        dtypes = self._check_fits(step, template, digest, digest_error)
        stored = jax.tree.map(
            lambda t, dtype: jax.ShapeDtypeStruct(t.shape, dtype, sharding=t.sharding),
            abstract_like(template),
            dtypes,
        )
        state, meta = self._read(step, stored)
        if digest is None:
            logging.warning(
                "Checkpoint %s predates checkpoint digests: restored without verification.",
                self._step_path(step),
            )
        else:
            mismatched = digest_mismatches(digest, state_digest(state))
            if mismatched:
                raise _Damaged(
                    f"{len(mismatched)} array(s) differ from the digest saved with them, "
                    f"first {mismatched[0]}"
                )
        return _cast_like(state, template), meta

    def _has_digest(self, step):
        """Whether the checkpoint was saved with a digest: its folder is there, or orbax's step
        metadata lists the item (so that a deleted digest is damage, not an old checkpoint)."""
        if (self._step_path(step) / "digest").exists():
            return True
        try:
            return "digest" in (self._manager.metadata(step).item_handlers or {})
        except Exception:  # unreadable step metadata: judge by the folder alone
            return False

    def _read_digest(self, step):
        """(digest, error): (None, None) for a checkpoint written before digests existed."""
        if not self._has_digest(step):
            return None, None
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(digest=ocp.args.JsonRestore())
            )
            record = restored.digest
            if record.get("format") != DIGEST_FORMAT:
                raise ValueError(f"unknown digest format {record.get('format')!r}")
            return record["arrays"], None
        except Exception as e:  # a damaged JSON file shows up as any of several types
            return None, e

    def _stored_layout(self, step):
        """(layout, error) of the saved state from orbax's metadata, without reading data."""
        try:
            return _metadata_layout(self._manager.item_metadata(step)["state"]), None
        except Exception as e:  # a damaged or missing metadata file, of any type
            return None, e

    def _check_fits(self, step, template, digest, digest_error):
        """The stored dtype of each leaf of `template`, once the checkpoint is known to hold the
        template's structure and shapes.

        Two records describe a saved state: orbax's metadata and the digest. A checkpoint of
        another train state disagrees with the template in every record that can be read;
        damage to one file changes at most one of them, so a checkpoint whose records disagree
        with each other, or with one unreadable, is damaged, not foreign. A readable digest
        that fits the template settles it alone: damaged metadata or data then fails the read,
        or the digest check after it.
        """
        shapes = _template_shapes(template)
        names = jax.tree_util.tree_structure(template)
        digest_layout = None if digest is None else _digest_layout(digest)
        if digest_layout is not None and not _shape_differences(shapes, digest_layout):
            # Orbax's metadata is not read: a restore of a 946-array state on 8 CPU devices took
            # 4.1-4.9 s with it, 2.9-3.0 s without.
            return jax.tree.unflatten(names, [digest_layout[n][1] for n in shapes])
        metadata, metadata_error = self._stored_layout(step)
        saved = (metadata, digest_layout)
        records = [r for r in saved if r is not None]
        if not records:
            raise _Damaged(f"its metadata cannot be read ({_first_line(metadata_error)})")
        differences = [_shape_differences(shapes, r) for r in records]
        if all(differences):
            raise CheckpointError(
                f"The checkpoint at {self._step_path(step)} does not match this run's train "
                f"state (a different model, method or EMA config?): {differences[0]}. It was "
                f"left untouched; use another --workdir or the config it was written with."
            )
        if digest_error is not None:
            raise _Damaged(f"its digest cannot be read ({_first_line(digest_error)})")
        if len(records) == 2 and records[0] != records[1]:
            raise _Damaged("its metadata and its digest describe different arrays")
        layout = records[0]
        return jax.tree.unflatten(names, [layout[n][1] for n in shapes])

    def _read(self, step, stored_template):
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(stored_template), meta=ocp.args.JsonRestore()
        )
        error = None
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax and TensorStore raise many types for unreadable data
            error = e
        # A file read by only some processes may fail on those alone: all must fall back.
        if not _all_processes_agree(error is None):
            cause = _first_line(error) if error is not None else "another process could not"
            raise _Damaged(f"its data cannot be read ({cause})") from error
        return restored.state, restored.meta

    # ---------------------------------------------------------------------- moving aside
    def _step_path(self, step):
        return self.directory / str(step)

    def _aside_path(self, step, n):
        """`corrupt-<step>`, or `corrupt-<step>-<n>` for the n-th damaged checkpoint of that
        step: orbax lists only names that are steps, so it neither counts nor deletes these."""
        suffix = "" if n == 1 else f"-{n}"
        return self.directory / f"{CORRUPT_PREFIX}{step}{suffix}"

    def _free_aside_path(self, step):
        n = 1
        while self._aside_path(step, n).exists():
            n += 1
        return n, self._aside_path(step, n)

    def _set_aside(self, step, reason):
        """Rename a damaged checkpoint out of orbax's sight (never deleted). Process 0 renames
        and tells the others which name it used (0: it could not)."""
        source = self._step_path(step)
        if self.read_only:
            self.moved_aside.append((step, None, reason))
            logging.warning("Checkpoint %s is damaged (%s); skipped.", source, reason)
            return
        n, error = 0, None
        if jax.process_index() == 0:
            n, target = self._free_aside_path(step)
            try:
                source.rename(target)
            except OSError as e:
                n, error = 0, e
        n = _from_process_0(n)
        self._manager.reload()
        if n == 0:
            cause = _first_line(error) if error is not None else "see the log of process 0"
            raise CheckpointError(
                f"Checkpoint {source} is damaged ({reason}) and could not be moved aside: "
                f"{cause}. Move or delete it by hand, then resume."
            )
        target = self._aside_path(step, n)
        self.moved_aside.append((step, target, reason))
        logging.warning(
            "Checkpoint %s is damaged (%s); moved aside to %s.", source, reason, target.name
        )

    def _none_usable_message(self):
        lines = [f"No usable checkpoint in {self.directory}:"]
        for step, target, reason in self.moved_aside:
            where = f" (moved to {target.name})" if target is not None else ""
            lines.append(f"  step {step}{where}: {reason}")
        lines.append("Start a new run in another --workdir, or restore a copy of a checkpoint.")
        return "\n".join(lines)

    # --------------------------------------------------------------------------- other
    def reached_preemption(self, step):
        """True on every host once any host got a pre-emption notice (multi-host TPU/GPU)."""
        return self._manager.reached_preemption(step)

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()
