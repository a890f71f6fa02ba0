"""The code digest that ``--version``, the record and inspect's JSON carry (the values there
are tested with them): two builds of one version differ.

pip keeps an installed wheel when given another of the same version, so the version alone
cannot tell a user which code they run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mergekit_metagpt
import mergekit_metagpt_hook
from mergekit_metagpt import code_digest as digest_module
from mergekit_metagpt.code_digest import code_digest

PRINT = ("from mergekit_metagpt.code_digest import code_digest; print(code_digest()); "
         "import mergekit_metagpt; print(mergekit_metagpt.__file__)")


def _digest_of(entry, cwd) -> str:
    """code_digest() in a fresh Python that imports the packages from ``entry`` (a folder or
    a zip archive on PYTHONPATH), run in ``cwd`` (``python -c`` puts it first on sys.path)."""
    env = dict(os.environ, PYTHONPATH=str(entry))
    done = subprocess.run([sys.executable, "-c", PRINT], capture_output=True, text=True, env=env, cwd=str(cwd),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    digest, imported = done.stdout.splitlines()
    assert imported.startswith(str(entry)), imported
    return digest


def _copy(tmp_path, name, packages=(mergekit_metagpt, mergekit_metagpt_hook)):
    tree = tmp_path / name
    for package in packages:
        folder = os.path.dirname(package.__file__)
        shutil.copytree(folder, tree / os.path.basename(folder), ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_the_digest_follows_the_code_of_the_plugin_and_of_its_hook(tmp_path):
    here = code_digest()
    assert len(here) == 12 and int(here, 16) >= 0
    same = _copy(tmp_path, "same")
    assert _digest_of(same, same) == here  # where it is installed does not matter; what it holds does
    plugin = _copy(tmp_path, "plugin")
    with open(plugin / "mergekit_metagpt" / "method.py", "a") as f:
        f.write("\n# another build\n")
    hook = _copy(tmp_path, "hook")
    with open(hook / "mergekit_metagpt_hook" / "__init__.py", "a") as f:
        f.write("\n# another build\n")
    added = _copy(tmp_path, "added")
    (added / "mergekit_metagpt" / "extra.py").write_text("")
    digests = {here, _digest_of(plugin, plugin), _digest_of(hook, hook), _digest_of(added, added)}
    assert len(digests) == 4, digests


def test_a_zip_install_an_odd_file_name_or_no_hook_still_get_a_digest(tmp_path):
    here = code_digest()
    # a zip archive on PYTHONPATH (os.listdir cannot list it): the same files, the same digest
    archive = shutil.make_archive(str(tmp_path / "zipped"), "zip", str(_copy(tmp_path, "tozip")))
    assert _digest_of(archive, tmp_path) == here
    # a file name that is not UTF-8 (hashing its name raised UnicodeEncodeError)
    odd = _copy(tmp_path, "odd")
    with open(os.path.join(os.fsencode(odd / "mergekit_metagpt"), b"stray\xff.py"), "w"):
        pass
    odd_digest = _digest_of(odd, odd)
    # no hook package to be found (None in sys.modules: find_spec finds none)
    alone = _copy(tmp_path, "alone", packages=(mergekit_metagpt,))
    env = dict(os.environ, PYTHONPATH=str(alone))
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['mergekit_metagpt_hook'] = None; " + PRINT],
                          capture_output=True, text=True, cwd=str(alone), env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    alone_digest, imported = done.stdout.splitlines()
    assert imported.startswith(str(alone)), imported
    digests = [here, odd_digest, alone_digest]
    assert all(len(d) == 12 and int(d, 16) >= 0 for d in digests) and len(set(digests)) == 3, digests


def test_a_digest_that_cannot_be_made_fails_nothing(monkeypatch):
    from mergekit_metagpt.cli import version_text

    def broken(digest, package):  # not an OSError: any error
        raise RuntimeError(f"{package}: something unforeseen")

    monkeypatch.setattr(digest_module, "_update", broken)
    code_digest.cache_clear()
    try:
        assert code_digest() is None
        assert version_text().startswith(f"mergekit-metagpt {mergekit_metagpt.__version__} (code unknown; ")
    finally:
        monkeypatch.undo()
        code_digest.cache_clear()
    assert code_digest() is not None
