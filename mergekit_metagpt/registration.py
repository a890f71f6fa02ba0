"""Idempotent registration of the MetaGPT methods in mergekit's registry."""

from __future__ import annotations

import threading

from mergekit_metagpt.fork_safety import renew_after_fork

_LOCK = threading.RLock()
renew_after_fork(__name__, "_LOCK", factory=threading.RLock)
#: set while this thread registers: a mergekit import made by the registration itself,
#: which the start-up hook reports, must not register again inside it (the outer call
#: finishes the work)
_INSIDE = threading.local()
_METHODS = None


class MergekitUnusable(Exception):
    """Importing mergekit failed here (not: it is absent), for a reason of its own."""


def methods():
    """The method objects this plugin provides, built once."""
    global _METHODS
    if _METHODS is None:
        from mergekit_metagpt.method import VARIANTS, MetaGPTMerge

        _METHODS = tuple(MetaGPTMerge(name) for name in VARIANTS)
    return _METHODS


def register_all() -> None:
    """Register every method whose name mergekit does not know yet (safe to repeat),
    and attach the plugin's wrappers to the mergekit modules already imported."""
    if getattr(_INSIDE, "active", False):
        return
    try:
        from mergekit.merge_methods import registry
    except ModuleNotFoundError:
        raise
    except Exception as error:  # mergekit itself fails to import (another version, its dependencies)
        raise MergekitUnusable(error) from error

    with _LOCK:
        _INSIDE.active = True
        try:
            known = {method.spec.name for method in registry.registered_methods()}
            for method in methods():
                if method.spec.name not in known:
                    registry.register(method)
        finally:
            _INSIDE.active = False
    from mergekit_metagpt import integration

    integration.attach_loaded()


def on_module_loaded(name: str) -> None:
    """Called by the start-up hook when a watched mergekit module has been imported."""
    if name == "mergekit.merge_methods":
        register_all()
    else:
        from mergekit_metagpt import integration

        integration.attach(name)
