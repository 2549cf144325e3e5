"""mfd: QEMU's multifd RAM migration and mapped-ram save/restore as a multiprocess pipeline."""

__version__ = "0.1.0"

from mfd.api import RestoreResult, SaveResult, inspect, restore, save
from mfd.errors import MfdError
from mfd.options import MigrationParameters

__all__ = ["MfdError", "MigrationParameters", "RestoreResult", "SaveResult", "inspect",
           "restore", "save"]
