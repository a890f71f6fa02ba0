"""The start-up hook never breaks Python: no mergekit, broken mergekit, -S, two installs."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

import mergekit_metagpt_hook


def run_python(code, *flags, pythonpath=None, cwd=None):
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=300, cwd=cwd,
    )


def test_pth_file_is_installed_and_active():
    pth = os.path.join(sysconfig.get_paths()["purelib"], "mergekit_metagpt.pth")
    assert os.path.exists(pth)
    line = open(pth).read().strip()
    assert line.startswith("import ") and "mergekit_metagpt_hook" in line
    result = run_python("import sys; print(sys._mergekit_metagpt_hook_installed)")
    assert result.stdout.strip() == "True", result.stderr


def test_python_runs_when_mergekit_is_absent(tmp_path):
    # sitecustomize runs after the .pth lines: hide mergekit from every import
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "mergekit" or name.startswith("mergekit."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Hide())
    """))
    result = run_python("""
        import json, sys
        try:
            import mergekit.merge_methods
        except ModuleNotFoundError as error:
            print("absent:", error.name)
        print("ok", "torch" in sys.modules)
    """, pythonpath=[str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "absent: mergekit" in result.stdout and "ok False" in result.stdout
    assert result.stderr == ""


def fake_mergekit(root, merge_methods_source: str) -> str:
    """A stand-in mergekit package whose merge_methods runs the given source."""
    package = root / "mergekit" / "merge_methods"
    package.mkdir(parents=True)
    (root / "mergekit" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(merge_methods_source)
    return str(root)


def test_mergekit_failing_to_import_is_its_own_error(tmp_path):
    fake_mergekit(tmp_path, "raise RuntimeError('mergekit is broken')\n")
    result = run_python("""
        try:
            import mergekit.merge_methods
        except RuntimeError as error:
            print("mergekit said:", error)
        print("still alive")
    """, pythonpath=[str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "mergekit said: mergekit is broken" in result.stdout
    assert "still alive" in result.stdout


def test_registration_failure_only_warns(tmp_path):
    # a mergekit whose merge_methods has no registry: registering fails, importing does not
    fake_mergekit(tmp_path, "VALUE = 42\n")
    result = run_python("""
        import mergekit.merge_methods as m
        print("value", m.VALUE)
    """, pythonpath=[str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "value 42" in result.stdout
    assert "could not register the metagpt merge methods" in result.stderr


def test_python_dash_S_starts_and_explicit_import_still_registers():
    bare = run_python("import sys; print(hasattr(sys, '_mergekit_metagpt_hook_installed'))", "-S")
    assert bare.returncode == 0 and bare.stdout.strip() == "False", bare.stderr
    paths = [p for p in sys.path if p]
    explicit = run_python("""
        import mergekit_metagpt
        from mergekit.merge_methods import registry
        print(registry.get("metagpt").spec.name)
    """, "-S", pythonpath=paths)
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout.strip() == "metagpt"


def test_two_installs_register_once(tmp_path):
    # a second site directory holding another copy of the package's hook and .pth
    second = tmp_path / "site2"
    second.mkdir()
    shutil.copytree(os.path.dirname(mergekit_metagpt_hook.__file__), second / "mergekit_metagpt_hook")
    pth = os.path.join(sysconfig.get_paths()["purelib"], "mergekit_metagpt.pth")
    shutil.copy(pth, second / "mergekit_metagpt.pth")
    result = run_python(f"""
        import site, sys, warnings
        warnings.simplefilter("error")
        site.addsitedir({str(second)!r})
        hooks = [f for f in sys.meta_path if getattr(f, "is_mergekit_metagpt_hook", False)]
        from mergekit.merge_methods import registry
        import mergekit_metagpt
        names = [m.spec.name for m in registry.registered_methods()]
        print(len(hooks), names.count("metagpt"))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]
