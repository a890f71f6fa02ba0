"""The code digest that ``--version`` and the record carry (tested there): two builds of one
version differ.

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
from mergekit_metagpt.code_digest import code_digest

PRINT = "from mergekit_metagpt.code_digest import code_digest; print(code_digest())"


def _digest_of(tree) -> str:
    """code_digest() in a fresh Python that imports the packages from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    # run in the tree: ``python -c`` puts the working folder first on sys.path
    done = subprocess.run([sys.executable, "-c", PRINT + "; import mergekit_metagpt; print(mergekit_metagpt.__file__)"],
                          capture_output=True, text=True, env=env, cwd=str(tree), timeout=120)
    assert done.returncode == 0, done.stderr
    digest, imported = done.stdout.split()
    assert imported.startswith(str(tree)), imported
    return digest


def _copy(tmp_path, name):
    tree = tmp_path / name
    for package in (mergekit_metagpt, mergekit_metagpt_hook):
        folder = os.path.dirname(package.__file__)
        shutil.copytree(folder, tree / os.path.basename(folder), ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def test_the_digest_follows_the_code_of_the_plugin_and_of_its_hook(tmp_path):
    here = code_digest()
    assert len(here) == 12 and int(here, 16) >= 0
    same = _copy(tmp_path, "same")
    assert _digest_of(same) == here  # where it is installed does not matter; what it holds does
    plugin = _copy(tmp_path, "plugin")
    with open(plugin / "mergekit_metagpt" / "method.py", "a") as f:
        f.write("\n# another build\n")
    hook = _copy(tmp_path, "hook")
    with open(hook / "mergekit_metagpt_hook" / "__init__.py", "a") as f:
        f.write("\n# another build\n")
    added = _copy(tmp_path, "added")
    (added / "mergekit_metagpt" / "extra.py").write_text("")
    digests = {here, _digest_of(plugin), _digest_of(hook), _digest_of(added)}
    assert len(digests) == 4, digests

