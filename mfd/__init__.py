"""mfd: QEMU's multifd RAM migration and mapped-ram save/restore as a multiprocess pipeline.

The API is imported lazily, so channel processes (``python -m mfd.workers...``) start without
loading it.
"""

__version__ = "0.1.0"

_API = ("IncomingOptions", "MigrateOptions", "MigrateResult", "RestoreResult", "SaveResult",
        "incoming", "inspect", "migrate", "restore", "save")
__all__ = ["MfdError", "MigrationParameters", *_API]


def __getattr__(name: str):
    if name in _API:
        from mfd import api

        return getattr(api, name)
    if name == "MfdError":
        from mfd.errors import MfdError

        return MfdError
    if name == "MigrationParameters":
        from mfd.options import MigrationParameters

        return MigrationParameters
    raise AttributeError(f"module 'mfd' has no attribute {name!r}")
