"""The default of launch.py's --config: every field at its default value. For --mode=sample,
edit, eval and search without --config, launch.py reads the run's own config.json from
--workdir and applies the --config.x=value flags to it; this file only gives those flags the
fields they may name."""

from configs import common


def get_config():
    return common.base_config()
