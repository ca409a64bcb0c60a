"""Import a released checkpoint of OpenAI's consistency-model code as a run of this framework, so
that sampling, editing, ``--mode=eval`` and distillation read it like any workdir:

    python -m cm_jax.import_openai --checkpoint=cd_imagenet64_lpips.pt \\
        --config=configs/imagenet64_cd.py --workdir=workdirs/openai_cd_imagenet64_lpips
    python -m cm_jax.import_openai --checkpoint=path/to/cd-lpips/checkpoint_80 \\
        --config=configs/cifar10_cd_lpips.py --workdir=workdirs/openai_cd_lpips

The config's network says which release it is.

- ADM (openai/consistency_models, PyTorch, ImageNet 64 and LSUN 256): the ``.pt`` files are
  state dicts of guided-diffusion's ``UNetModel``, whose module names ``models/adm.py`` mirrors:
  the Flax path ``input_blocks_1_0/in_layers_2/kernel`` is the torch key
  ``input_blocks.1.0.in_layers.2.weight``. Converting is a rename, a transpose (convolutions OIHW
  to HWIO, the attention's 1-D convolutions [O, I, 1] likewise, linear layers [out, in] to
  [in, out]) and one permutation: openai/consistency_models builds its attention blocks with
  ``attention_type="flash"``, whose qkv convolution lays its output channels out as
  (q/k/v, head, channel), while ``models/adm.py`` reads guided-diffusion's legacy order (head,
  q/k/v, channel). Loading the flash weights into the legacy order gives bad samples
  (openai/consistency_models #25), so the importer reorders them; ``--qkv_layout=legacy`` takes
  guided-diffusion checkpoints as they are. torch reads the ``.pt`` (imported lazily); a state
  dict saved as ``.npz`` needs none.
- NCSN++ (openai/consistency_models_cifar10, JAX, CIFAR-10): the files are the Flax ``to_bytes``
  of the training state; ``models/ncsnpp.py`` creates its modules in the reference's order, so
  the state's ``params_ema`` (``--field``) is the parameter tree as it is.

The imported run holds the weights as θ and as every evaluation EMA, at step 0 (the released
files are EMA weights).
"""

import hashlib
import json
import os
import re

import jax
import numpy as np
from etils import epath

from cm_jax import checkpoint, config_checks, models, optim, torch_files, trainer, workdir_lock
from cm_jax.train_state import create_mesh, init_params, init_train_state

QKV_LAYOUTS = ("flash", "legacy")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class CheckpointImportError(ValueError):
    """The checkpoint does not fit the configured network, or the workdir is taken."""


def read_state_dict(path):
    """{torch key: float32 array} of a ``.pt`` state dict (torch on the CPU) or an ``.npz``."""
    if not os.path.isfile(path):
        raise CheckpointImportError(f"checkpoint {path!r} does not exist")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {key: f[key].astype(np.float32) for key in f.files}
    try:
        state = torch_files.load_tensors(path, "a state dict", "Or give the state dict as an .npz.")
    except (ImportError, torch_files.TorchFileError) as e:
        raise CheckpointImportError(str(e)) from e
    if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
        raise CheckpointImportError(
            f"{path!r} is not a state dict of tensors (a released "
            "openai/consistency_models checkpoint is one)"
        )
    return {key: value.float().numpy() for key, value in state.items()}


def torch_key(flax_path):
    """The torch state-dict key of a Flax parameter path: ``_<digits>`` become ``.<digits>``
    (Sequential indices) and the leaf takes its torch name."""
    *modules, leaf = flax_path
    names = [re.sub(r"_(\d+)", r".\1", module) for module in modules]
    return ".".join(names + [_TORCH_LEAF[leaf]])


def _heads(model_config, width):
    if model_config.num_head_channels == -1:
        return model_config.num_heads
    return width // model_config.num_head_channels


def _flash_to_legacy(tensor, heads):
    """Reorder qkv output channels (axis 0) from (3, heads, d) to (heads, 3, d)."""
    rest = tensor.shape[1:]
    d = tensor.shape[0] // (3 * heads)
    return tensor.reshape((3, heads, d) + rest).swapaxes(0, 1).reshape((-1,) + rest)


def to_flax(tensor, flax_path, model_config, qkv_layout):
    """One torch tensor in the layout of the Flax parameter at ``flax_path``."""
    if flax_path[-2] == "qkv" and qkv_layout == "flash":
        width = tensor.shape[0] // 3
        tensor = _flash_to_legacy(tensor, _heads(model_config, width))
    if flax_path[-1] != "kernel":
        return tensor
    if tensor.ndim == 2:  # Linear [out, in] -> Dense [in, out]
        return tensor.T
    if tensor.ndim == 3:  # Conv1d [O, I, 1] -> 1x1 Conv2d
        tensor = tensor[..., None]
    return tensor.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def adm_params(state_dict, config, qkv_layout="flash"):
    """The ADM parameters of ``config.model`` from a guided-diffusion state dict (see
    `_assemble` for what must fit)."""
    if config.model.name != "adm":
        raise CheckpointImportError(
            f"config.model.name={config.model.name!r}: the PyTorch "
            "releases of openai/consistency_models are ADM networks"
        )
    if qkv_layout not in QKV_LAYOUTS:
        raise CheckpointImportError(f"qkv_layout={qkv_layout!r}: use one of {QKV_LAYOUTS}")
    return _assemble(
        config,
        state_dict,
        torch_key,
        lambda tensor, path: to_flax(tensor, path, config.model, qkv_layout),
    )


def read_jcm_checkpoint(path):
    """The state dict of an openai/consistency_models_cifar10 checkpoint: the Flax
    ``to_bytes`` of its training state (``checkpoint_80`` and the like)."""
    from flax import serialization  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(path):
        raise CheckpointImportError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types for foreign bytes
        raise CheckpointImportError(f"{path!r} is not a Flax checkpoint (msgpack): {e}") from e
    if not isinstance(state, dict):
        raise CheckpointImportError(f"{path!r} holds a {type(state).__name__}, not a state")
    return state


def ncsnpp_params(state, config, field="params_ema"):
    """The NCSN++ parameters of ``config.model`` from the ``field`` of a restored
    openai/consistency_models_cifar10 state: its NCSNpp has the parameter paths of
    ``models/ncsnpp.py``, so this is a copy once every path and shape fits (`_assemble`)."""
    if config.model.name != "ncsnpp":
        raise CheckpointImportError(
            f"config.model.name={config.model.name!r}: the JAX "
            "releases of openai/consistency_models_cifar10 are NCSN++ "
            "networks"
        )
    if not isinstance(state.get(field), dict):
        raise CheckpointImportError(
            f"the checkpoint has no parameter tree {field!r}; its fields are {sorted(state)}"
        )
    flat = {"/".join(path): leaf for path, leaf in _flatten(state[field])}
    return _assemble(config, flat, "/".join, lambda array, path: array)


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _assemble(config, source, name_of, convert):
    """config.model's parameter tree, each leaf ``convert(source[name_of(path)], path)``. Every
    parameter must find its entry with the right shape, and every entry must be used: a
    mismatch (another network size, learn_sigma's six output channels, another attention
    layout) is one error naming the entries."""
    net = models.create_model(config.model)
    expected = jax.eval_shape(lambda: init_params(config, net, jax.random.PRNGKey(0)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
    params, missing, wrong, names = [], [], [], set()
    for path, shape in leaves:
        flax_path = tuple(entry.key for entry in path)
        name = name_of(flax_path)
        names.add(name)
        if name not in source:
            missing.append(name)
            params.append(None)
            continue
        value = convert(np.asarray(source[name], np.float32), flax_path)
        if value.shape != shape.shape:
            wrong.append(
                f"{name}: {tuple(np.shape(source[name]))} gives {value.shape}, "
                f"the network has {shape.shape}"
            )
        params.append(value)
    unused = sorted(set(source) - names)
    if missing or wrong or unused:
        problems = (
            [f"missing {k}" for k in missing[:5]] + wrong[:5] + [f"unused {k}" for k in unused[:5]]
        )
        raise CheckpointImportError(
            f"the checkpoint does not fit config.model ({len(missing)} entries missing, "
            f"{len(wrong)} of another shape, {len(unused)} unused): "
            + "; ".join(problems)
            + ". Give the config the checkpoint was trained with (configs/imagenet64_*.py or "
            "lsun256_*.py for the PyTorch releases, configs/cifar10_*.py for the JAX ones)."
        )
    return jax.tree_util.tree_unflatten(treedef, params)


def write_run(config, params, workdir, source):
    """A workdir holding ``params`` as θ and every EMA at step 0, its config.json, and
    ``imported.json`` (the source file, its sha256, the qkv layout). Never overwrites a run."""
    root = epath.Path(workdir)
    with workdir_lock.acquire(workdir):
        if (root / "config.json").exists() or (root / "checkpoints").exists():
            raise CheckpointImportError(f"{workdir!r} already holds a run; give an empty --workdir")
        mesh = create_mesh()
        net = models.create_model(config.model)
        tx, _ = optim.make_optimizer(config.optim)
        state = init_train_state(config, net, tx, mesh, initial_params=params)
        ckpt = checkpoint.Checkpointer(root / "checkpoints")
        try:
            ckpt.save(0, state, trainer.data_meta(config))
            ckpt.wait()
        finally:
            ckpt.close()
        config_checks.record_config(workdir, config, {}, 0)
        (root / "imported.json").write_text(json.dumps(source, indent=2))


def import_checkpoint(path, config, workdir, qkv_layout="flash", field="params_ema"):
    """Read, convert and write: the whole command. The network decides the format: ADM
    checkpoints are PyTorch state dicts, NCSN++ ones Flax states."""
    if config.model.name == "ncsnpp":
        params = ncsnpp_params(read_jcm_checkpoint(path), config, field)
        source = {"field": field}
    else:
        params = adm_params(read_state_dict(path), config, qkv_layout)
        source = {"qkv_layout": qkv_layout}
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    write_run(
        config, params, workdir, {"checkpoint": os.path.abspath(path), "sha256": digest, **source}
    )


def main(argv):
    del argv
    try:
        import_checkpoint(
            FLAGS.checkpoint, FLAGS.config, FLAGS.workdir, FLAGS.qkv_layout, FLAGS.field
        )
    except CheckpointImportError as e:
        raise SystemExit(f"import_openai: {e}") from None
    print(f"imported {FLAGS.checkpoint} into {FLAGS.workdir}")


if __name__ == "__main__":
    from absl import app, flags  # pylint: disable=ungrouped-imports
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    flags.DEFINE_string(
        "checkpoint", None, "The released .pt (or its state dict as .npz).", required=True
    )
    config_flags.DEFINE_config_file(
        "config",
        None,
        "The run config, e.g. configs/imagenet64_cd.py (variant after ':'); "
        "--config.x=y overrides.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "An empty folder for the imported run.", required=True)
    flags.DEFINE_enum(
        "qkv_layout",
        "flash",
        QKV_LAYOUTS,
        "ADM: flash for openai/consistency_models, legacy for guided-diffusion.",
    )
    flags.DEFINE_string(
        "field", "params_ema", "NCSN++: the parameter tree of the Flax state to import."
    )
    flags.mark_flags_as_required(["config"])
    app.run(main)
