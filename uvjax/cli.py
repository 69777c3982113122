"""The flags every uvjax command shares (``--config``, ``--workdir``), defined once on absl's global flag set
by whichever command (or test, or experiment driver) asks first, so commands never import each other to
share a flag."""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags


def define_config_flag() -> None:
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vqvq.py:tiny", lock_config=True)


def define_workdir_flag() -> None:
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, "Run directory (default: config.workdir or runs/<config.name>)")
