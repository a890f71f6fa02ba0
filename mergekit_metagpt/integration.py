"""Thin wrappers around mergekit entry points, installed by the start-up hook.

MetaGPT's λ are global: a merge method that sees one tensor at a time must know the
whole merge plan. mergekit hands a method neither the plan nor the output folder, so
the plugin wraps, without changing what they do:

- ``mergekit.graph.TaskUniverse.__init__``: every graph merge (``mergekit-yaml``,
  ``run_merge``, ``mergekit-multi``, ``mergekit-pytorch``, ``--multi-gpu``) builds one
  task universe from its plan, in the thread that starts the merge, before any
  tensor is written. The wrapper records the plan's MetaGPT tasks
  (``merge_plan.register_universe``), checks them (``MergeRun.check``: each file they
  read opens, among others) and, for a merge of another method or one planned outside
  ``run_merge`` (``mergekit-pytorch``), removes an earlier run's record from the folder
  the plan's writer task writes to.
- ``mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask.execute``: sets a
  context variable naming the task being executed, in whichever thread runs it, so
  the method can find its plan.
- ``mergekit.io.tasks.FinalizeModel.execute``: writes the record once mergekit has
  written the model (a merge killed midway, which no wrapper outlives, leaves none; an
  earlier run's goes when the pre-pass ends); where that wrapper is missing, the record
  is written when the pre-pass ends, and the ``run_merge`` wrapper removes it if the merge
  then fails.
- ``mergekit.tokenizer.build.BuildTokenizer.execute`` (``tokenizer_source``): the
  merge and the pre-pass share one tokenizer build (``plan_inputs.SharedInputs``).
- ``mergekit.merge.run_merge``: checks a MetaGPT recipe before anything is read (its
  keys where it is given the recipe's text, its parameters, dtypes and module names,
  and that each model's folder, config and mergekit loader open, naming the model that
  does not), removes an earlier run's record (another method: once planned, through the
  task universe's wrapper, or before the merge without it; MetaGPT: after one that wrote
  none), makes the output folder and options known to the plan (record, progress bar),
  and adds the λ tables to the model card mergekit has just written.
- ``mergekit.scripts.multimerge.load_config`` (``mergekit-multi``): checks each MetaGPT
  recipe of the file (keys, parameters, dtypes) before the first merge runs.
- ``mergekit.plan.MergePlanner.plan_module`` / ``plan_tensor``, for MetaGPT recipes
  only: a warning when mergekit plans none of a module's weights (it leaves out
  optional weights no input holds under its architecture's names, silently: e.g. the
  whole language model of a LLaVA checkpoint whose architecture mergekit infers).
- ``mergekit.scripts.merge_raw_pytorch.plan_flat_merge`` (``mergekit-pytorch``, which
  runs no ``run_merge``): checks a MetaGPT recipe's parameters, base and dtypes as
  ``run_merge``'s wrapper does.
- ``main.callback`` of ``mergekit.scripts.run_yaml``, ``merge_raw_pytorch``,
  ``multimerge`` and ``legacy`` (the click commands of ``mergekit-yaml``,
  ``mergekit-pytorch``, ``mergekit-multi`` and ``mergekit-legacy``): a refusal of the
  plugin's (``MetaGPTError``) ends the command as click's one ``Error: …`` line, exit
  status 1, not a traceback; ``mergekit-legacy --method metagpt`` without
  ``--no-normalize`` is refused as such.

Where mergekit has changed shape (a class, attribute or parameter missing), the wrapper
is not installed; a warning says so when the hook sees the module load. Without one of
the first two, a MetaGPT graph merge then stops with an error naming the missing
wrapper instead of guessing its λ; without the planner's, merges run and only its
warning is off. Nothing here reads mergekit's call stack.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from mergekit_metagpt.fork_safety import renew_after_fork

LOG = logging.getLogger("mergekit_metagpt")

#: The ExecuteMergeMethodTask whose execute() is running in this thread.
CURRENT_TASK: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar(
    "mergekit_metagpt_current_task", default=None
)


@dataclass
class RunContext:
    """A ``run_merge`` call in progress: what the plan cannot tell."""

    out_path: Optional[Union[str, os.PathLike]]  # None: a plan made without run_merge
    config: object
    options: object
    runs: List[object] = field(default_factory=list)  # merge_plan.MergeRun objects
    #: model -> (its loader's index, the fingerprint of its files) when run_merge began,
    #: before mergekit opened any of them (``planning.open_loaders``)
    input_keys: Dict[object, tuple] = field(default_factory=dict)


#: Inside a mergekit command (its click callback) in this thread: a dict that receives the
#: MergeOptions mergekit-pytorch's plan_flat_merge is handed, for its plan, made without
#: run_merge (quiet). None outside.
RAW_OPTIONS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
    "mergekit_metagpt_raw_options", default=None
)

#: The run_merge call in progress in this thread (None outside run_merge).
RUN_CONTEXT: contextvars.ContextVar[Optional[RunContext]] = contextvars.ContextVar(
    "mergekit_metagpt_run_context", default=None
)

_LOCK = threading.Lock()
renew_after_fork(__name__, "_LOCK")
_ATTACHED: Dict[str, bool] = {}
#: Why a wrapper could not be installed, by module name (empty when all is well).
PROBLEMS: Dict[str, str] = {}


def _is_ours(method_name) -> bool:
    from mergekit_metagpt.method import VARIANTS

    return isinstance(method_name, str) and method_name in VARIANTS


# -- the wrappers ------------------------------------------------------------------
def _need(owner, attribute: str, where: str):
    """``owner.attribute``, or an AttributeError that names what mergekit lacks (not
    Python's "partially initialized module" message: the hook runs while the import of
    `owner` is still being finished)."""
    value = getattr(owner, attribute, None)
    if value is None:
        raise AttributeError(f"{where} has no attribute {attribute!r}")
    return value


def _unwrapped(function):
    """The function to wrap, or None when this module's wrapper is already in place.

    A wrapper from another copy of this module (the plugin's modules imported afresh,
    e.g. after their removal from ``sys.modules``) is replaced rather than wrapped
    again: the wrappers must share their context variables with the modules the
    method imports now. A reload keeps the module's globals, so its wrapper stays.
    """
    if not getattr(function, "_mergekit_metagpt_wrapper", False):
        return function
    if getattr(function, "__globals__", None) is globals():
        return None
    return function.__wrapped__


def _attach_graph(module) -> None:
    universe = _need(module, "TaskUniverse", module.__name__)
    original = _unwrapped(_need(universe, "__init__", "TaskUniverse"))
    if original is None:
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from mergekit_metagpt import merge_plan

        merge_plan.register_universe(self, RUN_CONTEXT.get())

    __init__._mergekit_metagpt_wrapper = True
    universe.__init__ = __init__


def _attach_task_adapter(module) -> None:
    task_cls = _need(module, "ExecuteMergeMethodTask", module.__name__)
    original = _unwrapped(_need(task_cls, "execute", "ExecuteMergeMethodTask"))
    if original is None:
        return

    @functools.wraps(original)
    def execute(self, *args, **kwargs):
        if not _is_ours(getattr(self, "method_name", None)):
            return original(self, *args, **kwargs)
        from mergekit_metagpt.buffers import refuse_unequal_buffers

        # before mergekit's own check, which names no model (and may come first, in its order)
        refuse_unequal_buffers(getattr(getattr(self, "output_weight", None), "name", None),
                               kwargs.get("tensors", args[0] if args else None), getattr(self, "base_model", None))
        token = CURRENT_TASK.set(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            CURRENT_TASK.reset(token)

    execute._mergekit_metagpt_wrapper = True
    task_cls.execute = execute


def _attach_io_tasks(module) -> None:
    """``FinalizeModel.execute`` (mergekit writes the model's last shard and its index),
    which every graph merge's plan ends with (``run_merge``'s and ``mergekit-pytorch``'s):
    the record is written then, so that a merge stopped or failed before leaves none
    beside its partial output."""
    task_cls = _need(module, "FinalizeModel", module.__name__)
    original = _unwrapped(_need(task_cls, "execute", "FinalizeModel"))
    if original is None:
        return

    @functools.wraps(original)
    def execute(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from mergekit_metagpt.merge_plan import run_for_task

        run = run_for_task(self)
        if run is not None and run.record_at_end:
            from mergekit_metagpt.record import write_record

            changed = run.changed_inputs()
            if changed:  # no record of λ the weights may not have been merged with
                LOG.warning(
                    "MetaGPT: the files of %s changed while the merge read them: the merged weights may mix "
                    "the old files and the new, and the λ may not be those of the files merged; no record "
                    "written: run the merge again", ", ".join(map(str, changed)))
            else:
                write_record(run)
        return result

    execute._mergekit_metagpt_wrapper = True
    task_cls.execute = execute


def _attach_tokenizer_build(module) -> None:
    """``BuildTokenizer.execute`` (``tokenizer_source``: mergekit loads every model's
    tokenizer and builds the merged vocabulary and token maps), which the pre-pass needs
    too, for the token-aligned tensors: in a merge, computed once for both (see
    ``plan_inputs.SharedInputs``)."""
    task_cls = _need(module, "BuildTokenizer", module.__name__)
    original = _unwrapped(_need(task_cls, "execute", "BuildTokenizer"))
    if original is None:
        return

    @functools.wraps(original)
    def execute(self, *args, **kwargs):
        from mergekit_metagpt.merge_plan import run_for_task
        from mergekit_metagpt.plan_inputs import computing_alone

        from mergekit_metagpt.plan_inputs import alone_for
        from mergekit_metagpt.token_maps import (aligned_models, aligned_reads, check_token_maps, embedding_rows,
                                                 forced_tokens)

        run = alone_for() if computing_alone() else run_for_task(self)

        def built():
            info = original(self, *args, **kwargs)
            # a MetaGPT merge's, or its pre-pass's: named, not a KeyError or IndexError
            found = aligned_reads(run, self)
            check_token_maps(info, aligned_models(found), embedding_rows(found), forced_tokens(found))
            return info

        if computing_alone():
            return built()
        if run is None:
            return original(self, *args, **kwargs)
        if not run.merge_executes_plan:
            return built()
        return run.shared_inputs.value(self, "merge", built)

    execute._mergekit_metagpt_wrapper = True
    task_cls.execute = execute


def _attach_merge(module) -> None:
    original = _unwrapped(_need(module, "run_merge", module.__name__))
    if original is None:
        return
    signature = inspect.signature(original)
    for name in ("merge_config", "out_path", "options"):
        if name not in signature.parameters:
            raise AttributeError(f"run_merge has no parameter {name!r}")

    @functools.wraps(original)
    def run_merge(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        config = bound.arguments.get("merge_config")
        from mergekit_metagpt.record import remove_stale_record

        if not _is_ours(getattr(config, "merge_method", None)):
            _refuse_our_method_misspelt(getattr(config, "merge_method", None))
            if not attached("mergekit.graph"):  # else: once planned (register_universe), so that
                # a merge that fails before (a missing parameter, a model not found) keeps it
                remove_stale_record(bound.arguments.get("out_path"))
            return original(*args, **kwargs)
        from mergekit_metagpt.recipe_checks import check_config, check_recipe_writable

        # the keys first: a misspelt key (base_modle) is what the other checks then miss
        _check_recipe_keys(bound.arguments.get("config_source"))
        check_config(config)
        options = bound.arguments.get("options")
        check_recipe_writable(config, bound.arguments.get("config_source"), options)
        if getattr(config, "modules", None):
            _check_module_names(config, options)
        from mergekit_metagpt.leftover_weights import weight_files
        from mergekit_metagpt.output_lock import held

        out_path = bound.arguments.get("out_path")
        held_before = weight_files(out_path)  # what an earlier run left there
        made = _folders_to_make(out_path)  # by mergekit (or the lock), before the pre-pass
        with held(out_path):  # before the checks: a second merge into the folder is refused at once
            input_keys = {}
            try:
                if options is not None:  # mergekit's run_merge needs them (and says so)
                    from mergekit_metagpt.planning import (
                        check_device_there, check_models_open, check_output_writable, refuse_output_into_an_input,
                    )

                    check_device_there(options)
                    input_keys = check_models_open(config, options)
                    refuse_output_into_an_input(config, out_path)
                    check_output_writable(out_path)
            except BaseException:
                _remove_if_empty(made)  # made for the lock: they go
                raise
            # an earlier run's record stays until the pre-pass ends (before the first merged
            # tensor), so a merge that fails before leaves the folder as it was
            context = RunContext(out_path=out_path, config=config, options=options, input_keys=input_keys)
            return _run_merge_in(context, made, held_before, original, args, kwargs)

    run_merge._mergekit_metagpt_wrapper = True
    module.run_merge = run_merge


def _run_merge_in(context, made, held_before, original, args, kwargs):
    """mergekit's run_merge in `context` (its output folder locked), then what the plugin
    writes beside its output: the record's removal where none is of this run, the card's
    sections, the config's mended sizes, the warning of leftover weights."""
    from mergekit_metagpt.card import add_card_sections
    from mergekit_metagpt.leftover_weights import warn_of_leftovers
    from mergekit_metagpt.record import remove_stale_record

    token = RUN_CONTEXT.set(context)
    try:
        result = original(*args, **kwargs)
    except BaseException as error:
        _remove_if_empty(made)  # left empty: they go
        # a merge that failed or was interrupted after its pre-pass (it may have
        # written weights) leaves no record beside weights it did not write (its own
        # is there only where FinalizeModel's wrapper is missing: written when the
        # pre-pass ended)
        written = any(run.record_written for run in context.runs)
        if written or any(run.result is not None for run in context.runs):
            remove_stale_record(context.out_path, "the unfinished merge's" if written else "the earlier run's",
                                stopped=error)
        raise
    finally:
        RUN_CONTEXT.reset(token)
        from mergekit_metagpt.scratch import release_thread_scratch

        release_thread_scratch()
    if not any(run.record_written for run in context.runs):  # no record of this run's
        remove_stale_record(context.out_path)
    add_card_sections(context)
    from mergekit_metagpt.output_config import mend_vocab_sizes

    mend_vocab_sizes(context)
    warn_of_leftovers(context.out_path, held_before)
    return result


def _folders_to_make(out_path) -> List[str]:
    """The folders `os.makedirs(out_path)` (mergekit's, or the output lock's) would make, the
    deepest first, as written (``a/../b/c`` makes ``a`` too, and ``b`` where it is missing,
    never an existing ``b``); none where `out_path` exists or is no path."""
    if not isinstance(out_path, (str, os.PathLike)):
        return []
    folder, missing = os.fspath(out_path), []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder.rstrip(os.sep)) if folder.rstrip(os.sep) else ""
        if parent == folder:
            break
        folder = parent
    # "a/../b" is missing only while "a" is: a folder that exists once its path is
    # resolved was not made for this merge
    return [folder for folder in missing if not os.path.lexists(os.path.abspath(folder))]


def _remove_if_empty(folders: List[str]) -> None:
    """The folders mergekit made for a merge that failed before writing into them
    (`_folders_to_make`), the deepest first, each where it is empty: anything in one keeps
    it and those above it."""
    for folder in folders:
        if os.path.basename(folder.rstrip(os.sep)) in (".", ".."):
            continue
        try:
            os.rmdir(folder)
        except OSError:
            return


def _refuse_our_method_misspelt(name) -> None:
    """A merge method mergekit does not know that is one of ours in another spelling
    (``MetaGPT``, ``metagpt-ties``): named, with the spelling meant (mergekit's own
    message, mid-planning: "Unimplemented merge method MetaGPT")."""
    from mergekit_metagpt.method import meant_variant

    meant = meant_variant(name)
    if meant is None:
        return
    try:
        from mergekit.merge_methods import registry

        registry.get(name)
        return  # a method of that name is registered: mergekit's to run
    except Exception:
        pass
    from mergekit_metagpt.errors import MetaGPTError

    raise MetaGPTError(f"merge_method {name!r} is not a method mergekit knows; did you mean {meant!r}?")


def _check_recipe_keys(config_source) -> None:
    """The recipe's keys mergekit does not read (``recipe_keys``), where ``run_merge`` is
    given the recipe's text (``mergekit-yaml`` passes its file's)."""
    if not isinstance(config_source, str):
        return
    import yaml

    from mergekit_metagpt.recipe_keys import check_duplicate_keys, check_recipe_keys

    try:
        data = yaml.safe_load(config_source)
    except yaml.YAMLError:  # not the text of the configuration: nothing to compare
        return
    check_duplicate_keys(config_source)
    check_recipe_keys(data)


def _check_module_names(config, options) -> None:
    """A ``modules:`` recipe's names against the architecture's, which mergekit's
    ``run_merge`` works out first thing (its message for a misspelt one: ``KeyError``)."""
    from mergekit_metagpt.recipe_checks import check_module_names

    try:
        from mergekit.architecture import get_architecture_info

        arch_info = get_architecture_info(config, options)
    except Exception:  # mergekit's run_merge raises the same next, in its own words
        return
    check_module_names(config, arch_info, options)


#: Set on a planner while it plans one module of a MetaGPT recipe: a mark per weight it
#: planned, and the names of those it skipped.
_PLANNED = "_mergekit_metagpt_planned"


def _attach_plan(module) -> None:
    planner = _need(module, "MergePlanner", module.__name__)
    tensor_original = _unwrapped(_need(planner, "plan_tensor", "MergePlanner"))
    module_original = _unwrapped(_need(planner, "plan_module", "MergePlanner"))
    if tensor_original is None or module_original is None:
        return
    tensor_signature = inspect.signature(tensor_original)
    module_signature = inspect.signature(module_original)
    for function, signature, name in ((tensor_original, tensor_signature, "weight"),
                                      (module_original, module_signature, "module_name")):
        if name not in signature.parameters:  # left off: merges run as they would without it
            raise AttributeError(f"MergePlanner.{function.__name__} has no parameter {name!r}")

    @functools.wraps(tensor_original)
    def plan_tensor(self, *args, **kwargs):
        seen = self.__dict__.get(_PLANNED)
        if seen is None:  # not a MetaGPT module being planned
            return tensor_original(self, *args, **kwargs)
        tensors = getattr(self, "_tensors", None)
        before = len(tensors) if isinstance(tensors, list) else None
        result = tensor_original(self, *args, **kwargs)
        if before is not None and len(self._tensors) > before:
            seen[0].append(True)  # planned: counted
        elif before is not None:  # skipped: named in the warning
            weight = tensor_signature.bind(self, *args, **kwargs).arguments["weight"]
            seen[1].append(getattr(weight, "name", str(weight)))
        return result

    @functools.wraps(module_original)
    def plan_module(self, *args, **kwargs):
        if not _is_ours(getattr(getattr(self, "config", None), "merge_method", None)):
            return module_original(self, *args, **kwargs)
        arguments = module_signature.bind(self, *args, **kwargs).arguments
        _check_slice_depths(arguments.get("definition"), arguments["module_name"])
        outer = self.__dict__.get(_PLANNED)
        planned, skipped = self.__dict__[_PLANNED] = ([], [])
        try:
            result = module_original(self, *args, **kwargs)
        finally:
            if outer is None:
                self.__dict__.pop(_PLANNED, None)
            else:  # planned from inside another module's planning: its lists again
                self.__dict__[_PLANNED] = outer
        if skipped and not planned:
            module_name = arguments["module_name"]
            LOG.warning(
                "MetaGPT: mergekit plans none of the %d weights of module %s (e.g. %s): no input "
                "model holds them under the names mergekit's architecture gives them, and mergekit "
                "0.1.5 leaves out such optional weights with no message, whatever the merge method. "
                "The merged model lacks them, and the λ are taken without them.",
                len(skipped), module_name, ", ".join(repr(n) for n in skipped[:2]),
            )
        return result

    plan_tensor._mergekit_metagpt_wrapper = True
    plan_module._mergekit_metagpt_wrapper = True
    planner.plan_tensor = plan_tensor
    planner.plan_module = plan_module


def _check_slice_depths(definition, module_name) -> None:
    """Name the inputs of a slice that take different numbers of layers (mergekit 0.1.5 says
    only "All inputs to a slice must contain the same number of layers"); for a ``models:``
    recipe, mergekit's slice takes each model's whole depth."""
    for number, out_slice in enumerate(getattr(definition, "slices", None) or (), 1):
        sources = getattr(out_slice, "sources", None) or ()
        ranges = [tuple(getattr(s, "layer_range", None) or ()) for s in sources]
        if len(ranges) < 2 or any(len(r) != 2 for r in ranges):
            continue
        if len({b - a for a, b in ranges}) > 1:
            from mergekit_metagpt.errors import MetaGPTError

            listed = "; ".join(f"{s.model}: layer_range [{a}, {b}], {b - a} layer{'' if b - a == 1 else 's'}"
                               for s, (a, b) in zip(sources, ranges))
            raise MetaGPTError(
                f"MetaGPT: the inputs of slice {number} of module {module_name} take different numbers of "
                f"layers ({listed}); mergekit merges layer by layer, so each input needs as many. A "
                f"`models:` recipe takes each model's whole depth: give `slices:` with `layer_range`s of "
                f"one length, or models of the base's depth"
            )


def _one_line_errors(module, check_arguments=None) -> None:
    """mergekit's click command of a script (``main``): a MetaGPTError (a refusal of the
    plugin's: what to fix, in one message) ends it as click's own ``Error: …`` line with
    exit status 1, where Python printed a traceback whose last line said it. Other
    exceptions keep their traceback; ``MERGEKIT_METAGPT_DEBUG=1`` prints it for these too,
    before their ``Error: …`` line.
    `check_arguments`: called with the command's keyword arguments before it runs."""
    import click

    from mergekit_metagpt.errors import MetaGPTError, one_line

    command = _need(module, "main", module.__name__)
    original = _unwrapped(_need(command, "callback", f"{module.__name__}.main"))
    if original is None:
        return

    class Refusal(click.ClickException, MetaGPTError):
        """Shown by click as one line; still a MetaGPTError (a ValueError) for a caller of
        the command with ``standalone_mode=False``."""

    @functools.wraps(original)
    def callback(*args, **kwargs):
        from mergekit_metagpt.env import DEBUG_SWITCH, switched_on

        # mergekit-pytorch plans without run_merge: its options (quiet), which its
        # plan_flat_merge is handed, reach the plan through this holder
        token = RAW_OPTIONS.set({})
        try:
            if check_arguments is not None:
                check_arguments(kwargs)
            return original(*args, **kwargs)
        except MetaGPTError as error:
            if isinstance(error, click.ClickException):
                raise
            if switched_on(DEBUG_SWITCH):  # the traceback first, then the same one line
                import traceback

                traceback.print_exc()
            raise Refusal(one_line(error)) from error
        finally:
            RAW_OPTIONS.reset(token)

    callback._mergekit_metagpt_wrapper = True
    command.callback = callback


def _attach_legacy(module) -> None:
    """``mergekit-legacy``: one-line refusals, and ``--method metagpt`` without
    ``--no-normalize`` refused as such (the command writes ``normalize: true`` unless told
    otherwise, which a MetaGPT recipe refuses in words the command's user never wrote)."""

    def check_arguments(arguments) -> None:
        if _is_ours(arguments.get("method")) and arguments.get("normalize"):
            from mergekit_metagpt.errors import MetaGPTError
            from mergekit_metagpt.recipe_checks import NORMALIZE_HELP

            raise MetaGPTError(
                f"mergekit-legacy --method {arguments['method']} needs --no-normalize (without it, "
                f"mergekit-legacy writes normalize: true): {NORMALIZE_HELP}")

    _one_line_errors(module, check_arguments)


def _attach_raw_pytorch(module) -> None:
    """``mergekit-pytorch``: one-line refusals, and a MetaGPT recipe's parameters, base
    and dtypes checked as ``run_merge`` checks them (it runs no ``run_merge``: an unknown
    parameter was ignored silently), before anything is read."""
    _one_line_errors(module)
    original = _unwrapped(_need(module, "plan_flat_merge", module.__name__))
    if original is None:
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def plan_flat_merge(config, *args, **kwargs):
        holder = RAW_OPTIONS.get()
        if holder is not None:  # inside the command: its MergeOptions (an argument with `quiet`)
            holder["options"] = next((a for a in (*args, *kwargs.values()) if hasattr(a, "quiet")), None)
        if _is_ours(getattr(config, "merge_method", None)):
            from mergekit_metagpt.planning import check_device_there, check_output_writable, check_raw_files
            from mergekit_metagpt.recipe_checks import check_config, check_raw_paths

            check_config(config)
            check_raw_paths(config)
            bound = signature.bind_partial(config, *args, **kwargs).arguments
            options, out_path = bound.get("options"), bound.get("out_path")
            if options is not None:
                check_device_there(options)
            check_raw_files(module, config, out_path, options, bool(bound.get("tensor_intersection")))
            check_output_writable(out_path)
        return original(config, *args, **kwargs)

    plan_flat_merge._mergekit_metagpt_wrapper = True
    module.plan_flat_merge = plan_flat_merge


def _attach_multimerge(module) -> None:
    try:
        _one_line_errors(module)
    except AttributeError:  # mergekit changed shape there: refusals keep their traceback
        pass
    original = _unwrapped(_need(module, "load_config", module.__name__))
    if original is None:
        return

    @functools.wraps(original)
    def load_config(config_source, *args, **kwargs):
        result = original(config_source, *args, **kwargs)
        _check_multimerge(config_source, result)
        return result

    load_config._mergekit_metagpt_wrapper = True
    module.load_config = load_config


def _check_multimerge(config_source, loaded) -> None:
    """Every MetaGPT recipe of a ``mergekit-multi`` file, checked as ``run_merge`` checks one
    (keys, parameters, dtypes) before the first merge runs: mergekit runs them one after
    the other, and a bad recipe would otherwise stop the run only after the merges before
    it. The models are not opened here (intermediate merges do not exist yet)."""
    import yaml

    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.recipe_checks import check_config, check_serialisable
    from mergekit_metagpt.recipe_keys import check_duplicate_keys, check_recipe_keys

    try:
        docs = list(yaml.safe_load_all(config_source))
        configs = loaded[0]
    except Exception:  # mergekit changed shape: each recipe is checked by run_merge
        return
    if any(isinstance(doc, dict) and _is_ours(doc.get("merge_method")) for doc in docs):
        check_duplicate_keys(config_source, "the mergekit-multi file")
    for doc in docs:
        if isinstance(doc, dict):
            _refuse_our_method_misspelt(doc.get("merge_method"))
        if isinstance(doc, dict) and _is_ours(doc.get("merge_method")):
            name = doc.get("name")
            check_recipe_keys({k: v for k, v in doc.items() if k != "name"},
                              f"merge {name!r}" if name is not None else "the final merge")
    for name, config in getattr(configs, "items", lambda: [])():
        if _is_ours(getattr(config, "merge_method", None)):
            try:
                check_config(config)
                # mergekit-multi serialises each recipe before its first merge
                check_serialisable(config, "rename the folder (mergekit-multi writes every recipe out)")
            except MetaGPTError as error:  # which of the file's recipes
                where = f"merge {name!r}" if name is not None else "the final merge"
                text = str(error).removeprefix("MetaGPT: ")
                raise MetaGPTError(f"MetaGPT: {where} of the mergekit-multi file: {text}") from None


_ATTACHERS = {
    "mergekit.graph": _attach_graph,
    "mergekit.merge_methods.task_adapter": _attach_task_adapter,
    "mergekit.merge": _attach_merge,
    "mergekit.plan": _attach_plan,
    "mergekit.scripts.multimerge": _attach_multimerge,
    "mergekit.io.tasks": _attach_io_tasks,
    "mergekit.tokenizer.build": _attach_tokenizer_build,
    "mergekit.scripts.run_yaml": _one_line_errors,
    "mergekit.scripts.merge_raw_pytorch": _attach_raw_pytorch,
    "mergekit.scripts.legacy": _attach_legacy,
}
#: Without these two, a graph merge cannot know its plan (the method refuses to guess).
REQUIRED_FOR_GRAPH_MERGES = ("mergekit.graph", "mergekit.merge_methods.task_adapter")
_REFUSED = "Graph merges with metagpt will refuse to run rather than guess their coefficients."
#: What is off where a wrapper cannot be installed (said in the warning).
WITHOUT_WRAPPER = {
    "mergekit.graph": _REFUSED,
    "mergekit.merge_methods.task_adapter": _REFUSED,
    "mergekit.merge": "Merges run, with their λ; the recipe's checks before anything is read, and "
                      "the λ tables in the model card, are off.",
    "mergekit.plan": "Merges run; the warning about modules mergekit plans nothing of is off, and "
                     "mergekit's message about slices of unequal depth names no input.",
    "mergekit.scripts.multimerge": "Merges run; mergekit-multi checks each recipe only when it merges it.",
    "mergekit.io.tasks": "Merges run; the record is written when the pre-pass ends, before the "
                         "weights (a merge killed midway leaves it).",
    "mergekit.tokenizer.build": "Merges run; with tokenizer_source, a merge loads the tokenizers and builds "
                                "the token maps twice (for the pre-pass and for the merge).",
    "mergekit.scripts.run_yaml": "Merges run; mergekit-yaml shows the plugin's refusals after a traceback.",
    "mergekit.scripts.legacy": "Merges run; mergekit-legacy shows the plugin's refusals after a "
                               "traceback.",
    "mergekit.scripts.merge_raw_pytorch": "Merges run; mergekit-pytorch checks no MetaGPT recipe's parameters "
                                          "before it reads, and shows the plugin's refusals after a traceback.",
}


def attach(name: str, final: bool = True) -> None:
    """Install the wrapper for module `name` if it is imported (idempotent).

    `final` is true when the module has finished importing; a missing attribute then
    means mergekit changed shape, which is reported once as a warning.
    """
    attacher = _ATTACHERS.get(name)
    module = sys.modules.get(name)
    if attacher is None or module is None:
        return
    with _LOCK:
        if _ATTACHED.get(name):
            return
        try:
            attacher(module)
        except AttributeError as error:
            if not final:
                return  # still being imported: the start-up hook attaches it later
            PROBLEMS[name] = f"{type(error).__name__}: {error}"
            consequence = WITHOUT_WRAPPER[name]
            try:
                from mergekit_metagpt_hook import warn
            except ImportError:  # an older copy of the hook first on the path
                def warn(message, stacklevel=1):
                    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
            warn(
                f"mergekit-metagpt: cannot attach to {name} ({error}); this mergekit "
                f"version differs from the one the plugin supports (0.1.x). {consequence}",
                stacklevel=3,
            )
            return
        _ATTACHED[name] = True
        PROBLEMS.pop(name, None)


def attach_loaded() -> None:
    """Attach to every watched module already imported, and make sure the start-up
    hook's finder is installed for the others (e.g. under ``python -S``)."""
    try:
        import mergekit_metagpt_hook

        mergekit_metagpt_hook.install()
    except Exception:  # pragma: no cover - the hook module ships with the package
        pass
    for name in _ATTACHERS:
        attach(name, final=False)


def attached(name: str) -> bool:
    return bool(_ATTACHED.get(name))


def missing_for_graph_merges() -> List[str]:
    """Wrappers a graph merge needs that are not installed, with the reason."""
    out = []
    for name in REQUIRED_FOR_GRAPH_MERGES:
        if not attached(name):
            out.append(f"{name} ({PROBLEMS.get(name, 'not attached')})")
    return out
