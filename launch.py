"""cm_jax entry point.

    python launch.py --config=configs/cifar10_ict.py:cpu --workdir=workdirs/ict_cpu \
        --config.data.dir=../shared/data/cifar10

Any config field can be overridden as --config.a.b=value. Everything a run writes goes to
--workdir: config.json, checkpoints/, metrics.jsonl, tensorboard/ and samples/. Re-running the
same command resumes from the newest checkpoint there. --mode=sample and --mode=edit read the
trained run in --workdir (its own config.json builds the model) and take their options from
the config's `sample` and `edit` sections.
"""

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally file.py:variant.", lock_config=True
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
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record):
    """Orbax logs every save step at INFO; keep its warnings and errors only."""
    return "orbax" not in record.pathname or record.levelno >= py_logging.WARNING


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax)
    # Imported here so that --help answers without initialising JAX.
    import jax

    from cm_jax import generate, trainer
    from cm_jax.evaluation import evaluate

    jax.config.parse_flags_with_absl()
    logging.info(
        "JAX %s, %d processes, devices: %s", jax.__version__, jax.process_count(), jax.devices()
    )
    if FLAGS.mode == "train":
        hooks = []
        if FLAGS.config.train.fid_every:
            hooks.append(evaluate.make_fid_hook(FLAGS.config))
        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, hooks)
    elif FLAGS.mode == "sample":
        generate.run_sample(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "edit":
        generate.run_edit(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "stats":
        evaluate.run_stats(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        evaluate.run_eval(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "search":
        evaluate.run_search(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
