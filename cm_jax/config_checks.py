"""Every setting of a run checked before it writes anything, and a resumed run's config held to
the one its checkpoints were trained with.

`check_settings` reads nothing but the config: a field with a fixed set of values must hold one
of them, counts and rates must be in range. All problems are reported together, in one error.

`resume_changes` compares the config of a resumed run with the workdir's config.json. A change
that alters what the checkpoints mean (the model, the method, the loss, the schedule, the
optimizer, the data order) is an error unless train.allow_config_change is set; every change,
allowed or harmless (a moved data folder, another log interval), is recorded in
`config_history.jsonl` before config.json is rewritten.
"""

import json
import time

from etils import epath

from cm_jax import distances, editing, lpips, methods, models, ode, optim, schedules

NONFINITE_MODES = ("stop", "skip")
SEARCH_KINDS = ("index", "sigma")
DTYPES = ("float32", "bfloat16")


def _choices():
    """field -> the values it may take (registries where the code has one)."""
    return {
        "method": sorted(methods.METHODS),
        "model.name": sorted(models.MODELS),
        "model.dtype": DTYPES,
        "loss.distance": sorted(distances.DISTANCES) + ["lpips"],
        "loss.lpips_variant": sorted(lpips.VARIANTS),
        "loss.weighting": schedules.WEIGHTINGS,
        "loss.index_sampling": schedules.INDEX_SAMPLINGS,
        "schedule.kind": schedules.KINDS,
        "schedule.mu_formula": schedules.MU_FORMULAS,
        "ect.mapping": schedules.ECT_MAPPINGS,
        "optim.name": sorted(optim.OPTIMIZERS),
        "teacher.solver": sorted(ode.SOLVERS),
        "sample.edm_solver": sorted(ode.SOLVERS),
        "edit.task": sorted(editing.TASKS),
        "search.kind": SEARCH_KINDS,
        "train.nonfinite": NONFINITE_MODES,
    }


# field -> (test, what the value must be)
_RANGES = {
    "optim.lr": (
        lambda v: v > 0,
        "must be > 0 (a rate of 0 trains nothing, a negative one ascends)",
    ),
    "optim.warmup_steps": (lambda v: v >= 0, "must be ≥ 0"),
    "optim.grad_clip": (lambda v: v >= 0, "must be ≥ 0 (0: no clipping)"),
    "optim.beta1": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "must be > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "must be ≥ 0"),
    "train.batch_size": (lambda v: v >= 1, "must be ≥ 1"),
    "train.num_steps": (lambda v: v >= 1, "must be ≥ 1"),
    "train.keep_checkpoints": (lambda v: v >= 1, "must be ≥ 1"),
    "train.num_sample_images": (lambda v: v >= 1, "must be ≥ 1"),
    "train.ema_rates": (
        lambda v: len(v) > 0 and all(0 <= r < 1 for r in v),
        "must lie in [0, 1), at least one",
    ),
    "data.image_size": (lambda v: v >= 1, "must be ≥ 1"),
    "data.num_channels": (lambda v: v in (1, 3), "must be 1 or 3"),
    "data.prefetch": (lambda v: v >= 1, "must be ≥ 1"),
    "karras.sigma_min": (lambda v: v > 0, "must be > 0"),
    "karras.sigma_data": (lambda v: v > 0, "must be > 0"),
    "karras.rho": (lambda v: v > 0, "must be > 0"),
    "schedule.mu0": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "schedule.target_ema": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    "schedule.total_steps": (lambda v: v >= 0, "must be ≥ 0 (0: train.num_steps)"),
    "model.num_classes": (lambda v: v >= 0, "must be ≥ 0 (0: unconditional)"),
}


def _get(config, field):
    """config.a.b for 'a.b', or KeyError."""
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def check_settings(config):
    """One ValueError listing every setting that is not allowed; reads nothing but `config`."""
    problems = []
    for field, allowed in _choices().items():
        try:
            value = _get(config, field)
        except KeyError:
            continue  # A section this config does not have (an older or smaller config).
        if value not in allowed:
            problems.append(f"{field}={value!r}: use one of {', '.join(map(str, allowed))}")
    for field, (ok, requirement) in _RANGES.items():
        try:
            value = _get(config, field)
        except KeyError:
            continue
        if not ok(value):
            problems.append(f"{field}={value!r} {requirement}")
    k = config.karras
    if k.sigma_min >= k.sigma_max:
        problems.append(f"karras.sigma_min={k.sigma_min} must be below sigma_max={k.sigma_max}")
    if problems:
        raise ValueError("Invalid settings:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------- resuming
# Sections and fields that change what a checkpoint's numbers mean, or which batches it saw.
# Left out: where files are (data.dir, teacher.workdir, loss.lpips_vgg_path), how often to log,
# save or sample, the attention kernel, and the sample/edit/eval/search sections.
MATH_FIELDS = (
    "method",
    "model",
    "karras",
    "loss",
    "schedule",
    "optim",
    "edm",
    "ect",
    "scm",
    "teacher.ema_rate",
    "teacher.step",
    "teacher.solver",
    "teacher.init_student",
    "data.dataset",
    "data.split",
    "data.image_size",
    "data.num_channels",
    "data.random_flip",
    "data.seed",
    "train.batch_size",
    "train.seed",
    "train.ema_rates",
    "train.microbatches",
    "train.nonfinite",
)
_NOT_MATH = ("model.attention_impl", "loss.lpips_vgg_path")


def _flat(tree, prefix=""):
    """{'a.b': value} of a nested dict (lists become tuples, for comparison)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _as_dict(config):
    """A ConfigDict or a dict as plain JSON values (what config.json holds)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config))


def _is_math(field, config):
    if field in _NOT_MATH:
        return False
    if field == "train.num_steps":  # K of the CT/iCT curricula when schedule.total_steps is 0.
        return config.schedule.kind in ("ct", "ict") and not config.schedule.total_steps
    return any(field == f or field.startswith(f + ".") for f in MATH_FIELDS)


def config_changes(saved, config):
    """{field: (saved value, new value)} for every field both configs have and that differs.
    Fields the saved config lacks (added to the code since) are not changes."""
    old, new = _flat(_as_dict(saved)), _flat(_as_dict(config))
    return {f: (old[f], new[f]) for f in sorted(old) if f in new and old[f] != new[f]}


def check_resume(saved, config):
    """The changes of a resumed run's config; ValueError listing those that alter the math,
    unless config.train.allow_config_change."""
    changes = config_changes(saved, config)
    math = {f: c for f, c in changes.items() if _is_math(f, config)}
    if math and not config.train.get("allow_config_change", False):
        listed = "\n  ".join(f"{f}: {old!r} -> {new!r}" for f, (old, new) in math.items())
        raise ValueError(
            "This workdir's checkpoints were trained with another config; resuming would change "
            f"what they mean:\n  {listed}\nUse the config the run was started with (its "
            "config.json), another --workdir, or --config.train.allow_config_change=True to "
            "resume with the change anyway."
        )
    return changes


def read_saved_config(workdir):
    """The workdir's config.json as a dict, or None."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or move it aside.") from e


def record_config(workdir, config, changes, step):
    """Write config.json; changes to a saved one are first appended to config_history.jsonl."""
    root = epath.Path(workdir)
    if changes:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "step": int(step),
            "changes": {f: [old, new] for f, (old, new) in changes.items()},
        }
        with (root / "config_history.jsonl").open("a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    (root / "config.json").write_text(config.to_json_best_effort(indent=2))
