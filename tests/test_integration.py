"""The plugin's wrappers around mergekit (``mergekit_metagpt.integration``).

- mergekit "changed shape": the wrapper is not installed, importing only warns, and a
  MetaGPT graph merge refuses to run with an error naming the missing wrapper;
- the wrappers are installed once, however often the plugin is imported or installed;
- ``python -S`` (no start-up hook) plus ``import mergekit_metagpt`` still attaches them.
"""

import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from checkpoints import closed_form, load_checkpoint
from merging import recipe

import mergekit

MERGEKIT_DIR = os.path.dirname(mergekit.__file__)
TESTS_DIR = os.path.dirname(__file__)
MODELS = ["model0", "model1", "model2"]

# The wrapped functions (module: attribute path; plan_tensor is wrapped with plan_module). wrap_depths() (source run in the
# subprocesses) counts the plugin's wrappers stacked on each: 1 means wrapped once.
WRAPPED = {
    "mergekit.graph": "TaskUniverse.__init__",
    "mergekit.merge_methods.task_adapter": "ExecuteMergeMethodTask.execute",
    "mergekit.merge": "run_merge",
    "mergekit.plan": "MergePlanner.plan_module",
}
WRAP_DEPTHS = """
import importlib

def wrap_depths():
    out = {}
    for module_name, path in WRAPPED.items():
        obj = importlib.import_module(module_name)
        for part in path.split("."):
            obj = getattr(obj, part)
        depth = 0
        while getattr(obj, "_mergekit_metagpt_wrapper", False):
            depth += 1
            obj = obj.__wrapped__
        out[module_name] = depth
    return out
"""


def run_python(code, *flags, pythonpath=None, timeout=300):
    env = dict(os.environ)
    env["MERGEKIT_METAGPT_PROGRESS"] = "0"
    paths = [TESTS_DIR] + list(pythonpath or [])
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    if "-S" in flags:  # no site: hand over the whole sys.path
        paths += [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    prelude = f"WRAPPED = {WRAPPED!r}\n" + WRAP_DEPTHS
    return subprocess.run(
        [sys.executable, *flags, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def merge_code(paths, out):
    """Source that runs a stock run_merge of a MetaGPT recipe into `out`."""
    config = recipe(paths, MODELS)
    return f"""
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
        run_merge(
            MergeConfiguration.model_validate({config!r}), {out!r},
            options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=True),
        )
    """


def assert_merged(out, sds):
    _, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    merged = load_checkpoint(out)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


# -- mergekit changed shape ---------------------------------------------------------
def reshaped_mergekit(root, renamed=(("graph.py", "multigpu_executor.py"), "TaskUniverse", "TaskCollection")) -> str:
    """A ``mergekit`` that is the installed one, except that the modules of `renamed`
    call a name by another (by default ``mergekit.graph``'s ``TaskUniverse``: a stand-in
    for a future mergekit's refactoring)."""
    files, old, new = renamed
    package = root / "mergekit"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(f"""
        # this folder first (its graph.py wins), then the installed mergekit's modules
        __path__.append({MERGEKIT_DIR!r})
        exec(compile(open({os.path.join(MERGEKIT_DIR, "__init__.py")!r}).read(), __file__, "exec"))
    """))
    for name in files:  # the modules that use the name
        (package / name).write_text(textwrap.dedent(f"""
            _source = open({os.path.join(MERGEKIT_DIR, name)!r}).read()
            exec(compile(_source.replace({old!r}, {new!r}), __file__, "exec"))
        """))
    return str(root)


def merge_with_reshaped(tmp_path, paths, out, module, renamed, *flags):
    """A stock run_merge of a MetaGPT recipe into `out` with `module` of a reshaped mergekit
    (see `reshaped_mergekit`); (the finished process, its stderr up to the import)."""
    fake = reshaped_mergekit(tmp_path / "fake", renamed)
    result = run_python(f"""
        import {module}
        assert {module}.__file__.startswith({fake!r}), {module}.__file__
        print("imported", file=__import__("sys").stderr, flush=True)
{textwrap.indent(textwrap.dedent(merge_code(paths, out)), " " * 8)}
        from mergekit_metagpt import integration
        print("attached", sorted(n for n in WRAPPED if integration.attached(n)))
    """, *flags, pythonpath=[fake])
    assert result.returncode == 0, result.stderr[-3000:]
    return result, result.stderr.split("imported")[0]


def test_changed_mergekit_only_warns_and_graph_merge_refuses_to_guess(llama_family, tmp_path):
    paths, _ = llama_family
    out = str(tmp_path / "out")
    fake = reshaped_mergekit(tmp_path / "fake")
    result = run_python(f"""
        import sys
        import mergekit.graph
        assert mergekit.graph.__file__.startswith({fake!r}), mergekit.graph.__file__
        assert not hasattr(mergekit.graph, "TaskUniverse")
        print("imported", file=sys.stderr, flush=True)
        from mergekit_metagpt import integration
        from mergekit_metagpt.errors import MetaGPTError
        try:
{textwrap.indent(textwrap.dedent(merge_code(paths, out)), " " * 12)}
        except MetaGPTError as error:
            print("refused:", error)
        else:
            print("merged")
        print("attached", sorted(n for n in WRAPPED if integration.attached(n)))
    """, pythonpath=[fake])
    assert result.returncode == 0, result.stderr
    warnings_before_merge = result.stderr.split("imported")[0]
    assert "RuntimeWarning: mergekit-metagpt: cannot attach to mergekit.graph" in warnings_before_merge
    assert "TaskUniverse" in warnings_before_merge
    assert "Traceback" not in result.stderr
    refused, attached = result.stdout.splitlines()
    assert refused.startswith("refused: MetaGPT: cannot find the merge plan of tensor"), refused
    assert "could not attach to mergekit.graph (AttributeError: mergekit.graph has no " \
           "attribute 'TaskUniverse')" in refused
    assert attached == "attached ['mergekit.merge', 'mergekit.merge_methods.task_adapter', 'mergekit.plan']"
    assert not os.path.exists(os.path.join(out, "metagpt_coefficients.json"))


def test_a_planner_of_another_shape_only_turns_the_module_check_off(llama_family, tmp_path):
    """The planner wrapper is not needed for λ: a mergekit whose planner has no
    plan_module warns that the check is off, and the merge runs, exact."""
    paths, sds = llama_family
    out = str(tmp_path / "out")
    result, before = merge_with_reshaped(tmp_path, paths, out, "mergekit.plan",
                                         (("plan.py",), "plan_module", "plan_output_module"))
    assert "cannot attach to mergekit.plan (MergePlanner has no attribute 'plan_module')" in before, before
    assert ("Merges run; the warning about modules mergekit plans nothing of is off, and mergekit's message "
            "about slices of unequal depth names no input.") in before
    assert result.stdout.splitlines()[-1] == (
        "attached ['mergekit.graph', 'mergekit.merge', 'mergekit.merge_methods.task_adapter']")
    assert_merged(out, sds)


def test_graph_merge_without_the_execute_wrapper_names_it(llama_family, tmp_path, monkeypatch):
    import mergekit_metagpt  # noqa: F401
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    from mergekit_metagpt import integration
    from mergekit_metagpt.errors import MetaGPTError

    name = "mergekit.merge_methods.task_adapter"
    wrapper = ExecuteMergeMethodTask.execute
    assert wrapper._mergekit_metagpt_wrapper
    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", wrapper.__wrapped__)
    monkeypatch.delitem(integration._ATTACHED, name)
    paths, _ = llama_family
    out = str(tmp_path / "out")
    namespace = {}
    with pytest.raises(MetaGPTError, match=r"could not attach to mergekit\.merge_methods\.task_adapter \(not attached\)"):
        exec(textwrap.dedent(merge_code(paths, out)), namespace)


def test_merge_task_outside_any_planned_merge_is_refused():
    # an ExecuteMergeMethodTask that no TaskUniverse registered (all wrappers in place)
    import mergekit_metagpt  # noqa: F401
    import torch
    from mergekit.architecture import WeightInfo
    from mergekit.common import ImmutableMap, ModelReference
    from mergekit.io.tasks import GatherTensors
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    from mergekit_metagpt import integration
    from mergekit_metagpt.errors import MetaGPTError

    assert integration.missing_for_graph_merges() == []
    base, other = (ModelReference.model_validate(n) for n in ("base", "other"))
    weight = WeightInfo(name="w")
    task = ExecuteMergeMethodTask(
        method_name="metagpt",
        gather_tensors=GatherTensors(weight_info=ImmutableMap({base: weight, other: weight})),
        model_order=(base, other),
        base_model=base,
        output_weight=weight,
        parameters=ImmutableMap({"lambda": 1.0, "granularity": "global"}),
        input_parameters=ImmutableMap({base: ImmutableMap({}), other: ImmutableMap({})}),
    )
    with pytest.raises(MetaGPTError, match="not planned by a mergekit entry point the plugin knows"):
        task.execute(tensors={base: torch.zeros(3), other: torch.ones(3)})


def _adapter_calling_the_public_entry(monkeypatch):
    """As a mergekit whose task adapter calls the method as ``merge_state_dicts`` does
    (``method(groups, parameters=…)``) in place of ``_execute_resolved``."""
    from mergekit_metagpt.method import MetaGPTMerge

    resolved = MetaGPTMerge._execute_resolved
    inside = []

    def public_entry(self, groups, parameters, **kwargs):
        if inside:  # __call__'s own call
            return resolved(self, groups, parameters, **kwargs)
        inside.append(True)
        try:
            return self(groups, parameters=parameters[0], dtype=kwargs.get("dtype"),
                        out_dtype=kwargs.get("out_dtype"))
        finally:
            inside.pop()

    monkeypatch.setattr(MetaGPTMerge, "_execute_resolved", public_entry)


def test_a_merge_task_that_calls_the_method_s_public_entry_still_merges_with_global_lambdas(
        llama_family, tmp_path, monkeypatch):
    """The tensor is still a planned task's: its λ are the pre-pass's over the whole model,
    not those of its own tensor (which the in-memory path would give, silently)."""
    import mergekit_metagpt  # noqa: F401

    _adapter_calling_the_public_entry(monkeypatch)
    paths, sds = llama_family
    out = str(tmp_path / "out")
    exec(textwrap.dedent(merge_code(paths, out)), {})
    assert_merged(out, sds)
    assert os.path.exists(os.path.join(out, "metagpt_coefficients.json"))


def test_a_merge_reaching_the_method_outside_its_tasks_is_refused(llama_family, tmp_path, monkeypatch):
    """Inside a MetaGPT run_merge, a tensor that reaches the method's public entry outside
    the wrapped merge tasks (a task adapter the plugin could not wrap) is refused before any
    weights are written, not merged with the λ of its own tensor."""
    import mergekit_metagpt  # noqa: F401
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    from mergekit_metagpt.errors import MetaGPTError

    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", ExecuteMergeMethodTask.execute.__wrapped__)
    _adapter_calling_the_public_entry(monkeypatch)
    paths, _ = llama_family
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match="reached the method outside the merge tasks the plugin wraps"):
        exec(textwrap.dedent(merge_code(paths, out)), {})
    assert not glob.glob(os.path.join(out, "*.safetensors"))


def test_a_merge_task_that_calls_merge_group_still_merges_with_global_lambdas(llama_family, tmp_path,
                                                                             monkeypatch):
    """mergekit's GroupMergeMethod API (``merge_group``, one group on its own) called by a
    merge task: the task's tensor takes the pre-pass's λ, not those of its own tensor."""
    import mergekit_metagpt  # noqa: F401
    from mergekit_metagpt.method import MetaGPTMerge

    monkeypatch.setattr(MetaGPTMerge, "_execute_resolved",
                        lambda self, groups, parameters, **kwargs: (self.merge_group(groups[0], **parameters[0]),))
    paths, sds = llama_family
    out = str(tmp_path / "out")
    exec(textwrap.dedent(merge_code(paths, out)), {})
    assert_merged(out, sds)


def test_several_tensors_handed_to_one_merge_task_are_refused(llama_family, tmp_path, monkeypatch):
    """A mergekit batching tensors into one task: the λ of each need its own task's plan."""
    import mergekit_metagpt  # noqa: F401
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.method import MetaGPTMerge

    resolved = MetaGPTMerge._execute_resolved
    monkeypatch.setattr(MetaGPTMerge, "_execute_resolved", lambda self, groups, parameters, **kwargs: resolved(
        self, [*groups, *groups], [*parameters, *parameters], **kwargs)[:1])
    paths, _ = llama_family
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match=r"mergekit handed tensor\(s\) '([\w.]+)', '\1' to the merge task of "
                                           r"'\1' \(a mergekit version the plugin does not know"):
        exec(textwrap.dedent(merge_code(paths, out)), {})
    assert not glob.glob(os.path.join(out, "*.safetensors"))


def test_an_in_memory_merge_made_while_a_task_runs_elsewhere_is_in_memory(llama_family):
    """A merge_state_dicts call in a context copied from a running merge task (another
    tensor, no run_merge of its own here) takes the λ of the tensors it is handed."""
    from types import SimpleNamespace

    import mergekit_metagpt  # noqa: F401
    from mergekit.merge_methods import merge_state_dicts

    from mergekit_metagpt import integration

    _, sds = llama_family
    models = {"base": sds["base"], **{m: sds[m] for m in MODELS}}
    alone = merge_state_dicts(models, "metagpt", base="base")
    token = integration.CURRENT_TASK.set(SimpleNamespace(output_weight=SimpleNamespace(name="elsewhere")))
    try:
        during = merge_state_dicts(models, "metagpt", base="base")
    finally:
        integration.CURRENT_TASK.reset(token)
    assert all(torch.equal(during[k], alone[k]) for k in alone)


def test_an_input_task_that_does_more_than_name_its_models_is_refused_before_any_read(
        llama_family, tmp_path, monkeypatch):
    """A mergekit whose GatherTensors does more than map its inputs to models (here: makes
    each contiguous) cannot be handed the load tasks by the pre-pass: refused with a message
    naming it, before the output folder is written."""
    import mergekit_metagpt  # noqa: F401
    from mergekit.io.tasks import GatherTensors

    from mergekit_metagpt.errors import MetaGPTError

    execute = GatherTensors.execute

    def contiguous(self, **kwargs):
        return {model: tensor.contiguous() for model, tensor in execute(self, **kwargs).items()}

    monkeypatch.setattr(GatherTensors, "execute", contiguous)
    paths, _ = llama_family
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match=r"GatherTensors does not map its inputs to models as in the mergekit "
                                           r"versions the plugin knows \(AttributeError: 'LoadTensor' object has "
                                           r"no attribute 'contiguous'\)"):
        exec(textwrap.dedent(merge_code(paths, out)), {})
    assert not glob.glob(os.path.join(out, "*.safetensors"))


# -- each function wrapped once -------------------------------------------------------
def test_wrappers_are_installed_once_however_often_the_plugin_loads(llama_family, tmp_path):
    paths, sds = llama_family
    out = str(tmp_path / "out")
    hook_dir = os.path.dirname(__import__("mergekit_metagpt_hook").__file__)
    result = run_python(f"""
        import importlib, importlib.util, sys, warnings
        warnings.simplefilter("error", RuntimeWarning)   # the plugin's warnings

        # a second copy of the hook, under another module name, installed as well
        spec = importlib.util.spec_from_file_location("second_hook", {hook_dir + "/__init__.py"!r})
        second = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(second)
        del sys._mergekit_metagpt_hook_installed
        second.install()
        hooks = [f for f in sys.meta_path if getattr(f, "is_mergekit_metagpt_hook", False)]
        assert "mergekit" not in sys.modules
        import mergekit.merge                      # both hooks see the watched imports
        print("two hooks", len(hooks), wrap_depths())

        # importing the plugin again, and again after a reload of each of its modules
        import mergekit_metagpt
        mergekit_metagpt.register_all()
        for name in ("mergekit_metagpt.integration", "mergekit_metagpt.registration", "mergekit_metagpt"):
            importlib.reload(sys.modules[name])
        print("reloaded", wrap_depths())

        # the plugin's modules imported afresh (new module objects)
        for name in [n for n in sys.modules if n.startswith("mergekit_metagpt") and n != "mergekit_metagpt_hook"]:
            del sys.modules[name]
        import mergekit_metagpt
        print("reimported", wrap_depths())

        # and one merge: one plan registered, one card section
        from mergekit_metagpt import card, merge_plan
        calls = {{"plan": 0, "card": 0}}
        def counting(module, attr, key):
            original = getattr(module, attr)
            def counted(*args, **kwargs):
                calls[key] += 1
                return original(*args, **kwargs)
            setattr(module, attr, counted)
        counting(merge_plan, "register_universe", "plan")
        counting(card, "add_card_sections", "card")
{textwrap.indent(textwrap.dedent(merge_code(paths, out)), " " * 8)}
        print("calls", calls["plan"], calls["card"])
    """)
    assert result.returncode == 0, result.stderr
    once = {name: 1 for name in WRAPPED}
    lines = result.stdout.splitlines()
    assert lines == [
        f"two hooks 2 {once}", f"reloaded {once}", f"reimported {once}", "calls 1 1",
    ], result.stderr
    assert_merged(out, sds)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert card.count("## MetaGPT coefficients") == 1


# -- python -S ----------------------------------------------------------------------
def test_python_dash_S_then_import_attaches_and_run_merge_works(llama_family, tmp_path):
    paths, sds = llama_family
    out = str(tmp_path / "out")
    once = {name: 1 for name in WRAPPED}
    result = run_python(f"""
        import sys
        assert not hasattr(sys, "_mergekit_metagpt_hook_installed"), "the .pth line ran under -S"
        import mergekit_metagpt
        from mergekit_metagpt import integration
{textwrap.indent(textwrap.dedent(merge_code(paths, out)), " " * 8)}
        print(wrap_depths() == {once!r}, integration.missing_for_graph_merges(), integration.PROBLEMS)
    """, "-S")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True [] {}"], result.stdout + result.stderr
    assert_merged(out, sds)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert card.count("## MetaGPT coefficients") == 1  # written by the run_merge wrapper
    assert os.path.exists(os.path.join(out, "metagpt_coefficients.json"))


def test_a_finished_merge_leaves_nothing_behind(llama_family, tmp_path, monkeypatch):
    """After run_merge returns, its MergeRun (tasks, config, norms) can be collected: a
    notebook or mergekit-multi running many merges does not keep every one of them; nor
    the work buffers of the thread that merged (GPU memory, with --cuda)."""
    import gc
    import weakref

    from mergekit.options import MergeOptions

    from merging import recipe, run_recipe
    from mergekit_metagpt import merge_plan, scratch

    paths, _ = llama_family
    runs, tasks = [], []

    def register(run):
        runs.append(weakref.ref(run))
        tasks.append(sum(len(s.tasks) for s in run.sets.values()))
        original(run)

    original = merge_plan.register
    monkeypatch.setattr(merge_plan, "register", register)
    for number in range(2):
        run_recipe(recipe(paths, ["model0", "model1"]), str(tmp_path / f"out{number}"),
                   MergeOptions(copy_tokenizer=False, quiet=True))
        gc.collect()
        assert runs[number]() is None
        assert getattr(scratch._LOCAL, "scratch", None) is None
        with merge_plan._REGISTRY_LOCK:  # mergekit's planner cache may keep the tasks
            assert all(run_ref() is None for _, run_ref in merge_plan._REGISTRY.values())
    # the second merge found every earlier run gone and dropped their entries (its merge
    # tasks and its FinalizeModel task are registered)
    with merge_plan._REGISTRY_LOCK:
        assert len(merge_plan._REGISTRY) <= tasks[1] + 1


def test_registering_a_run_while_the_collector_frees_an_old_one_does_not_hang():
    """The run registry's lock is held while it allocates; a collected task must not need
    that lock (a weakref callback run by the garbage collector in the same thread waited
    on it for ever). Checked in a child process, with a deadline."""
    script = textwrap.dedent(
        """
        import gc
        from mergekit_metagpt import merge_plan

        class Task:
            pass

        class Run:
            def __init__(self, tasks):
                self.sets = {"k": merge_plan.MergeSet("b", ("m",), tasks)}

        old = Task()
        old.cycle = old  # freed only by the cyclic collector
        run = Run([old])
        merge_plan.register(run)
        del old, run
        with merge_plan._REGISTRY_LOCK:  # as register holds it when the collector runs
            gc.collect()
        new = Run([Task()])
        merge_plan.register(new)
        assert merge_plan.run_for_task(new.sets["k"].tasks[0]) is new
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_run_merge_of_another_shape_warns_even_where_warnings_are_errors(llama_family, tmp_path):
    """A mergekit whose run_merge has no ``merge_config``: the warning says what is off,
    and it cannot break mergekit's import where warnings are errors (``-W error``, pytest's
    ``filterwarnings = error``: it was raised from inside ``import mergekit.merge``); the
    merge runs, exact."""
    paths, sds = llama_family
    out = str(tmp_path / "out")
    result, before = merge_with_reshaped(tmp_path, paths, out, "mergekit.merge",
                                         (("merge.py",), "merge_config", "config"), "-W", "error::RuntimeWarning")
    assert "cannot attach to mergekit.merge (run_merge has no parameter 'merge_config')" in before, before
    assert "Merges run, with their λ; the recipe's checks before anything is read, and the λ tables" in before
    assert result.stdout.splitlines()[-1] == (
        "attached ['mergekit.graph', 'mergekit.merge_methods.task_adapter', 'mergekit.plan']")
    assert_merged(out, sds)
