"""The start-up hook never breaks Python: no mergekit, broken mergekit, -S, two installs."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap


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


def hook_only_site(root):
    """A site directory holding only this plugin's start-up hook and its .pth line."""
    site_dir = root / "hook-site"
    site_dir.mkdir()
    source = os.path.dirname(mergekit_metagpt_hook.__file__)
    shutil.copytree(source, site_dir / "mergekit_metagpt_hook",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(source, "mergekit_metagpt.pth"), site_dir / "mergekit_metagpt.pth")
    return str(site_dir)


def run_isolated(code, site_dir, *extra_paths):
    """``python -I -S``: no site-packages (so no mergekit, no torch, no mergekit_metagpt),
    no PYTHONPATH, no current directory; then only `extra_paths` and `site_dir` (whose
    .pth line starts the hook, as at interpreter start)."""
    prelude = f"""
        import site, sys
        sys.path[:0] = {list(extra_paths)!r}
        site.addsitedir({site_dir!r})
        assert getattr(sys, "_mergekit_metagpt_hook_installed", False), "hook not installed"
        hooks = [f for f in sys.meta_path if getattr(f, "is_mergekit_metagpt_hook", False)]
        assert len(hooks) == 1, hooks
        started = sorted(m for m in sys.modules if m.split(".")[0] in ("mergekit", "torch", "mergekit_metagpt"))
        assert not started, started
    """
    return run_python(textwrap.dedent(prelude) + textwrap.dedent(code), "-I", "-S")


def test_python_runs_when_mergekit_is_absent(tmp_path):
    # The hook really starts in an interpreter that has no mergekit at all (nor torch,
    # nor the plugin's own package): the .pth line runs, then every watched import
    # fails with mergekit's own ModuleNotFoundError, and Python keeps going, silently.
    result = run_isolated("""
        for name in ("mergekit.merge_methods", "mergekit.merge", "mergekit.graph",
                     "mergekit.merge_methods.task_adapter", "mergekit"):
            try:
                __import__(name)
            except ModuleNotFoundError as error:
                print("absent:", name, error.name)
        print("ok", "torch" in sys.modules, "mergekit_metagpt" in sys.modules)
    """, hook_only_site(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:-1] == [
        f"absent: {name} mergekit" for name in (
            "mergekit.merge_methods", "mergekit.merge", "mergekit.graph",
            "mergekit.merge_methods.task_adapter", "mergekit")
    ]
    assert lines[-1] == "ok False False"


def test_python_runs_when_mergekit_lacks_the_watched_modules(tmp_path):
    # A ``mergekit`` that imports but has none of the watched submodules (another
    # package of that name, a stripped install): the hook's finder is asked for each
    # watched name, finds nothing, and the import fails as it would without the hook.
    fake = tmp_path / "fake"
    (fake / "mergekit").mkdir(parents=True)
    (fake / "mergekit" / "__init__.py").write_text("")
    result = run_isolated("""
        import mergekit
        for name in ("mergekit.merge_methods", "mergekit.merge", "mergekit.graph",
                     "mergekit.merge_methods.task_adapter"):
            try:
                __import__(name)
            except ModuleNotFoundError as error:
                print("absent:", name, error.name)
        print("ok", "torch" in sys.modules, "mergekit_metagpt" in sys.modules)
    """, hook_only_site(tmp_path), str(fake))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "absent: mergekit.merge_methods mergekit.merge_methods",
        "absent: mergekit.merge mergekit.merge",
        "absent: mergekit.graph mergekit.graph",
        "absent: mergekit.merge_methods.task_adapter mergekit.merge_methods",
        "ok False False",
    ]


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


def test_version_says_when_mergekit_fails_to_import(tmp_path):
    """A mergekit that does not import here (another version, or a dependency it does not
    work with: mergekit 0.1.4 under pydantic 2.14): --version printed a 100-line traceback,
    the diagnostic the README points to; it now says what fails and what to install."""
    import importlib.metadata

    fake_mergekit(tmp_path, "raise RuntimeError('cannot generate a schema for torch.Tensor')\n")
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-metagpt")
    shown = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert shown.returncode == 0, shown.stderr
    version = importlib.metadata.version("mergekit")
    assert shown.stdout.splitlines()[1] == (
        f"start-up hook: NOT active: mergekit {version} fails to import in this Python (RuntimeError: cannot "
        "generate a schema for torch.Tensor), and so mergekit-yaml fails too; pip install --force-reinstall "
        "mergekit==0.1.5, which installs the dependencies it asks for"), shown.stdout
    # importing the plugin leaves the error to mergekit's own import
    result = run_python("""
        import mergekit_metagpt
        try:
            import mergekit.merge_methods
        except RuntimeError as error:
            print("mergekit said:", error)
    """, pythonpath=[str(tmp_path)])
    assert result.returncode == 0 and "mergekit said: cannot generate" in result.stdout, result.stderr


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


def test_version_names_what_runs_and_whether_the_hook_is_active(tmp_path):
    import importlib.metadata

    import mergekit_metagpt
    from mergekit_metagpt.code_digest import code_digest

    script = os.path.join(os.path.dirname(sys.executable), "mergekit-metagpt")
    shown = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    first, hook, _ = shown.stdout.strip().splitlines()
    assert first.startswith(f"mergekit-metagpt {mergekit_metagpt.__version__} (code {code_digest()}; "
                            f"mergekit {importlib.metadata.version('mergekit')}, "), first
    assert mergekit_metagpt.__version__ == importlib.metadata.version("mergekit-metagpt")
    pth = os.path.join(sysconfig.get_paths()["purelib"], "mergekit_metagpt.pth")
    assert hook.startswith(f"start-up hook: active ({pth})"), hook
    # without site (as for a --target install on PYTHONPATH), the .pth line never runs:
    # --version says so, and what mergekit-yaml will then say
    paths = [p for p in sys.path if p]
    bare = run_python("from mergekit_metagpt.cli import main; main(['--version'])", "-S", pythonpath=paths)
    assert bare.returncode == 0, bare.stderr
    assert "start-up hook: NOT active in this Python" in bare.stdout
    assert "Unimplemented merge method metagpt" in bare.stdout
    # the .pth file is there but a broken copy of the hook's module comes first on sys.path
    shadow = tmp_path / "shadow" / "mergekit_metagpt_hook"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('a broken copy')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))
    shadowed = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300, env=env)
    assert shadowed.returncode == 0, shadowed.stderr
    assert f"start-up hook: NOT active: {pth} is there, but its module" in shadowed.stdout, shadowed.stdout


def test_version_says_when_the_mergekit_yaml_on_path_runs_a_python_without_the_plugin(tmp_path):
    """Two environments, the plugin in one: the mergekit-yaml a shell finds may be the
    other's, which says "Unimplemented merge method metagpt" while this one's --version
    said all was well."""
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-metagpt")
    other = tmp_path / "other" / "bin"
    other.mkdir(parents=True)
    python = other / "python"  # a Python without site-packages: no plugin there
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S -E "$@"\n')
    (other / "mergekit-yaml").write_text(f"#!{python}\nraise SystemExit('a stand-in')\n")
    wrapper = tmp_path / "wrapper" / "bin"  # a shell script that runs this Python's (module systems, Nix)
    wrapper.mkdir(parents=True)
    (wrapper / "mergekit-yaml").write_text(f'#!/bin/bash\nexec "{sys.executable}" -m mergekit.scripts.run_yaml "$@"\n')
    for each in (python, other / "mergekit-yaml", wrapper / "mergekit-yaml"):
        each.chmod(0o755)
    # run from a checkout of the plugin: `python -c` reads the current folder first
    checkout = tmp_path / "checkout"
    for package in ("mergekit_metagpt", "mergekit_metagpt_hook"):
        (checkout / package).mkdir(parents=True)
        (checkout / package / "__init__.py").write_text("")
    # as the command's own Python has it (a pytest started as ../.venv/bin/python keeps the ..)
    own = os.path.join(os.path.dirname(os.path.normpath(sys.executable)), "mergekit-yaml")
    # anyone's module in the shared temporary folder: the probe of the other Python must not
    # run it (it ran there, and `python -c` imports from the folder it runs in first)
    shared_tmp = tmp_path / "shared-tmp"
    shared_tmp.mkdir()
    planted = tmp_path / "planted-code-ran"
    (shared_tmp / "importlib.py").write_text(f"open({str(planted)!r}, 'w').close()\n")
    lines = {}
    for case, path in {"other": f"{other}{os.pathsep}{os.environ['PATH']}",
                       "wrapper": f"{wrapper}{os.pathsep}{os.environ['PATH']}",
                       "own": os.path.dirname(own), "none": str(tmp_path)}.items():
        shown = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, PATH=path, TMPDIR=str(shared_tmp)), cwd=str(checkout))
        assert shown.returncode == 0, shown.stderr
        lines[case] = shown.stdout.strip().splitlines()[-1]
    assert not planted.exists()
    assert os.listdir(shared_tmp) == ["importlib.py"]  # the probe's own folder is gone
    assert lines["wrapper"] == f"mergekit-yaml: {wrapper / 'mergekit-yaml'}"  # no Python to tell: no guess
    assert lines["other"] == (
        f"mergekit-yaml: {other / 'mergekit-yaml'} (WARNING: it runs another Python, {python}, which has no "
        "mergekit-metagpt: a MetaGPT recipe there ends in 'Unimplemented merge method metagpt'. Install "
        f"mergekit-metagpt into that Python ({python} -m pip install …), or run this Python's: {own})")
    assert lines["own"] == f"mergekit-yaml: {own} (this Python's)"
    assert lines["none"] == f"mergekit-yaml: not on PATH (this Python's: {own})"


def test_the_python_of_a_windows_launcher_is_read_from_its_shebang(tmp_path):
    """pip's console scripts on Windows are programs (``mergekit-yaml.exe``: a launcher, its
    ``#!`` line, a zip): the first line is the program's, so --version could never say that
    the mergekit-yaml found runs another Python."""
    import io
    import zipfile

    from mergekit_metagpt.cli import _script_python

    try:  # the launcher pip itself writes, where pip has it; else a stand-in program's bytes
        import pip._vendor.distlib as distlib

        program = open(os.path.join(os.path.dirname(distlib.__file__), "t64.exe"), "rb").read()
    except (ImportError, OSError):  # a venv without pip
        program = b"MZ" + bytes(range(256)) * 400
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("__main__.py", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())\n")
    for shebang, python in [(b'#!"C:\\Program Files\\Py 3\\python.exe"\r\n', "C:\\Program Files\\Py 3\\python.exe"),
                            (b"#!C:\\venv\\Scripts\\python.exe\n", "C:\\venv\\Scripts\\python.exe")]:
        launcher = tmp_path / "mergekit-yaml.exe"
        launcher.write_bytes(program + shebang + archive.getvalue())
        assert _script_python(str(launcher)) == python
    launcher.write_bytes(program + archive.getvalue())  # another program: no guess
    assert _script_python(str(launcher)) is None


def test_mergekit_imported_from_a_zip_archive_registers_and_does_not_hang(tmp_path):
    """One zipimporter loads every module of the archive: the hook's wrapper on it must act
    only for the module it was set for (it fired 'merge_methods loaded' for each later
    module, re-entered the registration and deadlocked `import mergekit.merge_methods`)."""
    import zipfile

    import mergekit

    source = os.path.dirname(mergekit.__file__)
    archive = tmp_path / "mergekit.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for folder, dirs, files in os.walk(source):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                path = os.path.join(folder, name)
                zf.write(path, os.path.relpath(path, os.path.dirname(source)))
    env = dict(os.environ, PYTHONPATH=str(archive))
    code = textwrap.dedent("""
        import mergekit.merge_methods  # this order deadlocked (others only warned)
        import mergekit, mergekit.merge, mergekit.plan
        from mergekit.merge_methods import registry
        from mergekit_metagpt import integration
        assert mergekit.__file__.startswith(%r), mergekit.__file__
        print(registry.get("metagpt").spec.name, integration.attached("mergekit.merge"))
    """ % str(archive))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["metagpt", "True"]
    # nor a warning (it fired for modules still being imported: a circular import)
    assert "mergekit-metagpt:" not in result.stderr, result.stderr[-2000:]


def test_a_registration_re_entered_from_its_own_imports_returns(monkeypatch):
    """An import made while registering that the hook reports as 'merge_methods loaded'
    calls register_all again in the same thread: it must return, not wait on the lock
    its own caller holds."""
    import threading

    from mergekit_metagpt import registration

    original = registration.methods
    inner = []

    def methods_that_re_enter():
        inner.append(registration.register_all())
        return original()

    monkeypatch.setattr(registration, "methods", methods_that_re_enter)
    worker = threading.Thread(target=registration.register_all, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "register_all deadlocked on its own re-entry"
    assert inner == [None]
