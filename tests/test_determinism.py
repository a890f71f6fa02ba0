"""The same recipe twice gives bit-identical output on CPU."""

import torch

from checkpoints import load_checkpoint
from merging import recipe, run_recipe
from mergekit_metagpt import prepass


def test_same_recipe_twice_is_bit_identical(llama_family_bf16, merge_options, tmp_path):
    paths, _ = llama_family_bf16
    config = recipe(paths, ["model0", "model1", "model2"], dtype="bfloat16")
    first = run_recipe(config, str(tmp_path / "a"), merge_options)
    prepass.clear_memo()  # the second run computes its norms afresh too
    second = run_recipe(config, str(tmp_path / "b"), merge_options)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name].view(torch.int16), second[name].view(torch.int16)), name
