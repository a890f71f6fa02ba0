"""The pre-pass progress bar: shown by default, hidden by mergekit's quiet option."""

import pytest

from merging import recipe, run_recipe
from mergekit_metagpt import prepass


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_follows_quiet(quiet, llama_family, tmp_path, monkeypatch, capsys):
    from mergekit.options import MergeOptions

    monkeypatch.delenv("MERGEKIT_METAGPT_PROGRESS")
    prepass.clear_memo()
    options = MergeOptions(copy_tokenizer=False, quiet=quiet)
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), options)
    err = capsys.readouterr().err
    assert ("MetaGPT norm pre-pass" in err) is (not quiet)
    if not quiet:
        assert "GB read" in err
