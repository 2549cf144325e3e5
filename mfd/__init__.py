"""mfd: QEMU's multifd RAM migration and mapped-ram save/restore as a multiprocess pipeline.

The API is imported lazily, so channel processes (``python -m mfd.workers...``) start without
loading it.
"""

__version__ = "0.1.0"

_API = ("MigrateResult", "RestoreResult", "SaveResult", "incoming", "inspect", "migrate",
        "restore", "save")
_OPTIONS = ("IncomingOptions", "MigrateOptions", "MigrationParameters", "RestoreOptions",
            "SaveOptions")
__all__ = ["MfdError", *_API, *_OPTIONS]


def __getattr__(name: str):
    if name in _API:
        from mfd import api

        return getattr(api, name)
    if name in _OPTIONS:
        from mfd import options

        return getattr(options, name)
    if name == "MfdError":
        from mfd.errors import MfdError

        return MfdError
    raise AttributeError(f"module 'mfd' has no attribute {name!r}")
