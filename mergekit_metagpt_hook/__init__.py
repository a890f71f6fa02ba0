"""Start-up hook for mergekit-metagpt, run from a ``.pth`` line at interpreter start.

It imports only ``sys`` (never torch, never mergekit). It installs a finder on
``sys.meta_path`` that waits for a few mergekit modules to finish importing:

- ``mergekit.merge_methods``: register the MetaGPT merge methods, so stock
  ``mergekit-yaml`` finds ``merge_method: metagpt`` without any extra import;
- ``mergekit.merge``, ``mergekit.graph``, ``mergekit.merge_methods.task_adapter``:
  install the plugin's thin wrappers (see ``mergekit_metagpt.integration``), which
  tell the method which merge plan and output folder a tensor belongs to;
- ``mergekit.plan``: a wrapper on the planner that warns when mergekit plans none of
  a module's weights;
- ``mergekit.scripts.multimerge``: ``mergekit-multi`` checks every MetaGPT recipe of
  its file before the first merge;
- ``mergekit.io.tasks``: a merge planned without ``run_merge`` (``mergekit-pytorch``)
  writes its record once mergekit has written the model;
- ``mergekit.tokenizer.build``: a merge with ``tokenizer_source`` loads the tokenizers
  once, for the pre-pass and the merge;
- ``mergekit.scripts.run_yaml``, ``mergekit.scripts.merge_raw_pytorch``,
  ``mergekit.scripts.legacy`` (and ``multimerge``): the plugin's refusals end
  ``mergekit-yaml``, ``mergekit-pytorch``, ``mergekit-legacy`` and ``mergekit-multi`` as
  one ``Error:`` line, not a traceback.

Nothing here may break Python: a missing or broken mergekit, a second copy of this
hook (two installs), or a failing registration only ever produces a warning.
"""

import sys

TARGET = "mergekit.merge_methods"
WATCHED = (
    "mergekit.merge_methods",
    "mergekit.merge",
    "mergekit.graph",
    "mergekit.merge_methods.task_adapter",
    "mergekit.plan",
    "mergekit.scripts.multimerge",
    "mergekit.io.tasks",
    "mergekit.tokenizer.build",
    "mergekit.scripts.run_yaml",
    "mergekit.scripts.merge_raw_pytorch",
    "mergekit.scripts.legacy",
)
_MARK = "_mergekit_metagpt_hook_installed"


class _AfterImport:
    """A meta-path finder that only acts on the WATCHED module names."""

    is_mergekit_metagpt_hook = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED:
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
            # a loader may serve many modules (one zipimporter for a whole archive keeps
            # this wrapper for every later module): act only for the module it was set for
            if getattr(module, "__name__", None) == fullname:
                _loaded(fullname)

        try:
            loader.exec_module = exec_module
        except Exception:
            return spec
        return spec


def _loaded(name):
    try:
        from mergekit_metagpt.registration import on_module_loaded

        on_module_loaded(name)
    except Exception as error:  # never break the import of mergekit itself
        what = "register the metagpt merge methods" if name == TARGET else f"attach to {name}"
        warn(f"mergekit-metagpt: could not {what}: {error!r}", stacklevel=2)


def warn(message, stacklevel=1):
    """A RuntimeWarning that cannot break the mergekit import it is given in: where
    warnings are errors (``-W error``, pytest's ``filterwarnings = error``), it is written
    to stderr instead of raised (code that never uses MetaGPT imports mergekit too)."""
    import warnings

    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
    except Warning:
        try:
            sys.stderr.write(f"RuntimeWarning: {message}\n")
        except Exception:
            pass


def _register():
    _loaded(TARGET)


def install():
    """Install the finder once per interpreter, however many .pth files call this."""
    if getattr(sys, _MARK, False):
        return
    setattr(sys, _MARK, True)
    sys.meta_path.insert(0, _AfterImport())
    if TARGET in sys.modules:
        _register()
