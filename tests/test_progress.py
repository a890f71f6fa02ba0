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


def test_log_lines_of_the_pre_pass_are_not_glued_to_mergekits_bar(llama_family, tmp_path):
    """mergekit-yaml's "Executing graph" bar leaves its line open in a file or pipe; the
    pre-pass's records came on that line (``Executing graph: 0%|…|INFO:mergekit_metagpt:…``),
    so a grep for the bar hid them. Each starts a line of its own, cold and warm."""
    import os
    import subprocess

    from merging import write_yaml

    config = write_yaml(recipe(llama_family[0], ["model0", "model1", "model2"]), str(tmp_path / "r.yml"))
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    for run in ("cold", "warm"):
        result = subprocess.run([script, config, str(tmp_path / run), "--no-copy-tokenizer", "-v"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Executing graph" in result.stderr  # the bar is there (not --quiet)
        ours = [line for line in result.stderr.split("\n") if "INFO:mergekit_metagpt:" in line]
        assert ours and all(line.startswith("INFO:mergekit_metagpt:") for line in ours), ours
        if run == "warm":
            assert sum("from the norm cache" in line for line in ours) == 3


def test_the_console_handlers_are_given_back_after_the_pre_pass(llama_family, tmp_path, monkeypatch):
    """While the pre-pass runs, a stand-in writes the root logger's console records; after
    it (and after a failed one) the root logger has its own handlers again."""
    import logging

    from mergekit.options import MergeOptions
    from mergekit_metagpt import progress

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(root, "handlers", root.handlers + [console])
    seen = []
    real = prepass.compute
    monkeypatch.setattr(prepass, "compute", lambda *a, **k: seen.append(list(root.handlers)) or real(*a, **k))
    before = list(root.handlers)
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), MergeOptions(copy_tokenizer=False))
    assert root.handlers == before
    assert console not in seen[0] and any(isinstance(h, progress._LineAboveBars) and h.original is console
                                          for h in seen[0])

    def failing(*a, **k):
        raise RuntimeError("a pre-pass that fails")

    monkeypatch.setattr(prepass, "compute", failing)
    prepass.clear_memo()
    with pytest.raises(Exception, match="a pre-pass that fails"):
        run_recipe(recipe(llama_family[0], ["model1"]), str(tmp_path / "out2"), MergeOptions(copy_tokenizer=False))
    assert root.handlers == before
