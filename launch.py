r"""cm_jax: train consistency models, sample and edit with them, evaluate them.

    python launch.py --config=configs/cifar10_ict.py:cpu --workdir=workdirs/ict_cpu \
        --config.data.dir=../shared/data/cifar10
    python launch.py --mode=sample --workdir=workdirs/ict_cpu --config.sample.num_samples=100

Any config field can be overridden as --config.a.b=value. Everything a run writes goes to
--workdir: config.json, checkpoints/, metrics.jsonl, tensorboard/ and samples/. Re-running the
same command resumes from the newest checkpoint there. --mode=sample, edit, eval and search read
the trained run in --workdir, whose own config.json builds the model and gives the defaults of
the sample, edit, eval and search sections; --config.x=value flags (or a --config file's
sections) override them.

Pods and clusters: run the same command on every host. Cloud TPU pods, SLURM and Open MPI jobs
are detected; on other clusters give --coordinator_address (process 0's host:port),
--num_processes and --process_id. --workdir must be storage every host sees (a shared file
system or gs://).
"""

import ast
import importlib
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = "configs/run.py"  # Every field at its default: see that file.
RUN_SECTIONS = ("sample", "edit", "eval", "search")  # What --config gives a trained run.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    os.path.join(HERE, DEFAULT_CONFIG),
    "Config file, optionally file.py:variant (see the list above). --mode=train needs one; "
    "the other modes default to the run's own config.json.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "sample", "edit", "stats", "eval", "search"],
    "train: train (or resume) the run in --workdir; sample / edit: use its "
    "checkpoints (config.sample / config.edit choose how); stats: FID reference "
    "statistics of config.data; eval: FID/sFID of the run's samples (config.eval); "
    "search: the two-step middle time point with the lowest FID (config.search).",
)
flags.DEFINE_string(
    "coordinator_address",
    "",
    "host:port of process 0, for a multi-process run where the cluster is not detected "
    "(Cloud TPU pods, SLURM and Open MPI are); with --num_processes and --process_id.",
)
flags.DEFINE_integer("num_processes", 0, "Processes of a multi-process run (hosts).")
flags.DEFINE_integer("process_id", -1, "This process's index in [0, --num_processes).")
flags.DEFINE_integer(
    "distributed_timeout",
    300,
    "Seconds a multi-process run waits for its coordinator and the other processes.",
)
flags.mark_flags_as_required(["workdir"])


def config_catalogue():
    """'configs/<file>.py  first docstring line  [variants]' for every experiment config."""
    sys.path.insert(0, HERE)
    lines = []
    folder = os.path.join(HERE, "configs")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py") or name in ("__init__.py", "common.py", "run.py"):
            continue
        module = importlib.import_module(f"configs.{name[:-3]}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        variants = ", ".join(f":{v}" for v in getattr(module, "VARIANTS", ()))
        lines.append(f"  {name:<20} {summary}\n  {'':<20} variants: {variants or 'none'}")
    return "Configs in configs/ (--config=configs/FILE or configs/FILE:variant):\n" + "\n".join(
        lines
    )


def _quiet_orbax(record):
    """Orbax logs every save step at INFO; keep its warnings and errors only."""
    return "orbax" not in record.pathname or record.levelno >= py_logging.WARNING


def _bad_config_flag(argv, error):
    """One line for a --config.x flag that names no field (ml_collections says which field and
    what it may have meant, quoted twice over, after a long traceback)."""
    text = str(error)
    try:  # ml_collections' message is the repr of "'field'\nDid you mean ...".
        text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    field, _, hint = text.partition("\n")
    field = field.strip("'\" ")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and field in a), "")
    hint = hint.strip() or "see the config file's fields (configs/common.py)"
    return f"{flag or '--config'}: the config has no field {field!r}. {hint}"


def parse_flags(argv):
    """absl's flag parsing, with the mistakes users make answered in one line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"launch.py: {e}\nPass --help for the modes, flags and config files.")
    except AttributeError as e:  # ml_collections: a --config.x.y that the config lacks.
        sys.exit(f"launch.py: {_bad_config_flag(argv, e)}")
    except ValueError as e:  # A config file's get_config(variant) refusing the variant.
        sys.exit(f"launch.py: --config: {e}")


def _config_was_given():
    return os.path.abspath(config_flags.get_config_filename(FLAGS["config"]).split(":")[0]) != (
        os.path.join(HERE, DEFAULT_CONFIG)
    )


def _with_overrides(config, overrides):
    """`config` with the --config.a.b=value flags applied."""
    for field, value in overrides.items():
        *sections, name = field.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    return config


def resolve_config(mode, workdir):
    """The config a mode runs with. train needs --config. The other modes start from the run's
    config.json where --workdir holds one: a --config file then gives only the sample, edit,
    eval and search sections, --config.x flags override single fields."""
    from cm_jax import runs

    given = _config_was_given()
    if mode == "train" or (mode == "stats" and given):
        if not given:
            raise app.UsageError("--mode=train needs --config (a file of configs/: see --help).")
        return FLAGS.config
    try:
        config = runs.read_run_config(workdir)
    except runs.RunError:
        if given:  # stats of a dataset into a fresh folder, or a run that is not there (the
            return FLAGS.config  # mode itself says so).
        raise
    if given:
        for section in RUN_SECTIONS:
            config[section] = FLAGS.config[section]
        return config
    return _with_overrides(config, config_flags.get_override_values(FLAGS["config"]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    # Imported here so that --help answers without initialising JAX.
    import jax

    from cm_jax import distributed

    jax.config.parse_flags_with_absl()
    try:
        distributed.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.distributed_timeout,
        )
    except distributed.DistributedStartError as e:
        sys.exit(f"launch.py: {e}")
    logging.info("JAX %s, %s", jax.__version__, distributed.describe())
    from cm_jax import generate, trainer
    from cm_jax.evaluation import evaluate, search

    config = resolve_config(FLAGS.mode, FLAGS.workdir)
    if FLAGS.mode == "train":
        hooks = [evaluate.make_fid_hook(config)] if config.train.fid_every else []
        trainer.train_and_evaluate(config, FLAGS.workdir, hooks)
    elif FLAGS.mode == "sample":
        generate.run_sample(config, FLAGS.workdir)
    elif FLAGS.mode == "edit":
        generate.run_edit(config, FLAGS.workdir)
    elif FLAGS.mode == "stats":
        evaluate.run_stats(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        evaluate.run_eval(config, FLAGS.workdir)
    elif FLAGS.mode == "search":
        search.run_search(config, FLAGS.workdir)


if __name__ == "__main__":
    if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in sys.argv[1:]):
        __doc__ = f"{__doc__}\n{config_catalogue()}\n"
    app.run(main, flags_parser=parse_flags)
