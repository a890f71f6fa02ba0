"""Start-up hook for mergekit-metagpt, run from a ``.pth`` line at interpreter start.

It imports only ``sys`` and ``warnings`` (never torch, never mergekit). It installs a
finder on ``sys.meta_path`` that waits for ``mergekit.merge_methods`` to be imported
and then registers the MetaGPT merge methods, so stock ``mergekit-yaml`` finds
``merge_method: metagpt`` without any extra import.

Nothing here may break Python: a missing or broken mergekit, a second copy of this
hook (two installs), or a failing registration only ever produces a warning.
"""

import sys

TARGET = "mergekit.merge_methods"
_MARK = "_mergekit_metagpt_hook_installed"


class _RegisterAfterImport:
    """A meta-path finder that only acts on ``mergekit.merge_methods``."""

    is_mergekit_metagpt_hook = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = None
        for finder in sys.meta_path:
            if getattr(finder, "is_mergekit_metagpt_hook", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            try:
                spec = find_spec(fullname, path, target)
            except Exception:
                spec = None
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if spec is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        try:
            loader.exec_module = exec_module
        except Exception:
            return spec
        return spec


def _register():
    try:
        from mergekit_metagpt.registration import register_all

        register_all()
    except Exception as error:  # never break the import of mergekit itself
        import warnings

        warnings.warn(
            f"mergekit-metagpt: could not register the metagpt merge methods: {error!r}",
            RuntimeWarning,
            stacklevel=2,
        )


def install():
    """Install the finder once per interpreter, however many .pth files call this."""
    if getattr(sys, _MARK, False):
        return
    setattr(sys, _MARK, True)
    if TARGET in sys.modules:
        _register()
        return
    sys.meta_path.insert(0, _RegisterAfterImport())
