"""Registration: import, idempotency, and the start-up hook in fresh interpreters."""

import importlib
import os
import subprocess
import sys
import textwrap


from checkpoints import closed_form, load_checkpoint
from merging import run_mergekit_yaml, recipe, write_yaml


def run_python(code, *args, env=None):
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300,
    )


def test_import_registers_once_and_is_idempotent():
    import mergekit_metagpt
    from mergekit.merge_methods import registry

    mergekit_metagpt.register_all()
    mergekit_metagpt.register_all()
    importlib.reload(mergekit_metagpt)
    names = [m.spec.name for m in registry.registered_methods()]
    assert names.count("metagpt") == 1


def test_hook_registers_without_import_and_loads_nothing_at_start():
    result = run_python("""
        import sys
        assert "torch" not in sys.modules and "mergekit" not in sys.modules, "imported at start"
        from mergekit.merge_methods import registry
        assert registry.get("metagpt").spec.name == "metagpt"
        assert "mergekit_metagpt" in sys.modules
        print("OK")
    """)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_hook_plus_explicit_import_does_not_raise_duplicate():
    result = run_python("""
        import mergekit.merge_methods
        import mergekit_metagpt
        mergekit_metagpt.register_all()
        from mergekit.merge_methods import registry
        print(sum(m.spec.name == "metagpt" for m in registry.registered_methods()))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_stock_mergekit_yaml_finds_metagpt(llama_family, tmp_path):
    paths, sds = llama_family
    models = ["model0", "model1", "model2"]
    config = write_yaml(recipe(paths, models), str(tmp_path / "recipe.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(config, out)
    assert result.returncode == 0, result.stdout + result.stderr
    _, reference = closed_form(sds["base"], [sds[m] for m in models])
    merged = load_checkpoint(out)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_the_hook_watches_every_module_the_plugin_attaches_to():
    """The hook (which imports only sys) keeps its own list: a wrapper added to
    integration without its module in the hook's list would not be installed by
    ``mergekit-yaml`` (no import of the plugin there)."""
    import mergekit_metagpt_hook as hook
    from mergekit_metagpt import integration

    assert set(hook.WATCHED) == set(integration._ATTACHERS) | {hook.TARGET}
