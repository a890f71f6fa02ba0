"""The same recipe twice gives bit-identical output on CPU, with both norms computed afresh."""

import torch

from merging import recipe, run_recipe
from mergekit.io.tasks import LoaderCache
from mergekit_metagpt import prepass


def test_same_recipe_twice_is_bit_identical(llama_family_bf16, merge_options, tmp_path, monkeypatch):
    # no disk cache and no in-process memo: each merge runs its own pre-pass
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    prepass.clear_memo()
    paths, _ = llama_family_bf16
    config = recipe(paths, ["model0", "model1", "model2"], dtype="bfloat16")
    runs = prepass.STATS.runs
    first = run_recipe(config, str(tmp_path / "a"), merge_options)
    assert prepass.STATS.runs == runs + 1
    LoaderCache().flush_all()
    second = run_recipe(config, str(tmp_path / "b"), merge_options)
    assert prepass.STATS.runs == runs + 2  # the second merge read its tensors again
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name].view(torch.int16), second[name].view(torch.int16)), name
