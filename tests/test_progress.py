"""The pre-pass progress bar: shown by default, hidden by mergekit's quiet option.

The bar follows the merge's own MergeOptions.quiet, never the process's command line:
a library caller's sys.argv may say anything.
"""

import sys

import pytest

from merging import recipe, run_recipe
from mergekit_metagpt import prepass


@pytest.mark.parametrize("quiet, argv", [
    (False, ["prog"]),
    (False, ["prog", "--quiet"]),  # someone else's --quiet: the bar still shows
    (True, ["prog"]),  # no --quiet on the command line: the option alone hides it
])
def test_progress_bar_follows_quiet(quiet, argv, llama_family, tmp_path, monkeypatch, capsys):
    from mergekit.options import MergeOptions

    monkeypatch.delenv("MERGEKIT_METAGPT_PROGRESS")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")  # the pre-pass really runs
    monkeypatch.setattr(sys, "argv", argv)
    prepass.clear_memo()
    options = MergeOptions(copy_tokenizer=False, quiet=quiet)
    runs = prepass.STATS.runs
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), options)
    assert prepass.STATS.runs == runs + 1
    err = capsys.readouterr().err
    assert ("MetaGPT norm pre-pass" in err) is (not quiet)
    if not quiet:
        assert "GB read" in err


def test_progress_can_be_turned_off_by_environment(llama_family, tmp_path, monkeypatch, capsys):
    from mergekit.options import MergeOptions

    monkeypatch.setenv("MERGEKIT_METAGPT_PROGRESS", "0")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    prepass.clear_memo()
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, quiet=False))
    assert "MetaGPT norm pre-pass" not in capsys.readouterr().err
