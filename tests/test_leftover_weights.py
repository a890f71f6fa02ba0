"""Weight files of an earlier run left in the output folder, which a loader reads instead of
the merge's (mergekit writes beside what a folder holds and removes nothing)."""

import logging
import os

import torch

from merging import recipe, run_recipe
from mergekit_metagpt.leftover_weights import weight_files

MODELS = ["model0", "model1", "model2"]
LEFT = "still holds weight files of an earlier run that this merge did not write"


def _merge(paths, out, options, caplog, models=MODELS, **changes):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergekit_metagpt"):
        run_recipe(recipe(paths, models), out, options.model_copy(update=changes))
    return [r for r in caplog.records if LEFT in r.getMessage()]


def _read_by_mergekit(out):
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    loader = LazyTensorLoader(ShardedTensorIndex.from_disk(out), lazy_unpickle=False)
    try:
        return {name: loader.get_tensor(name).clone() for name in loader.index.tensor_paths}
    finally:
        loader.flush()


def test_a_single_file_over_an_earlier_runs_shards_is_warned_of_as_what_mergekit_reads(
        llama_family, merge_options, tmp_path, caplog):
    """Sharded first, then one model.safetensors of other models: mergekit's loader (the next
    merge of mergekit-multi) reads the earlier index and shards, which the warning names;
    transformers reads the new file, so it is not named."""
    from safetensors.torch import load_file

    paths, _ = llama_family
    out = str(tmp_path / "out")
    assert not _merge(paths, out, merge_options, caplog, out_shard_size=20_000)
    shards = [n for n in weight_files(out) if n.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors.index.json" in weight_files(out)
    (warning,) = _merge(paths, out, merge_options, caplog, models=["model0", "model1"])
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert (f"mergekit reads the earlier model.safetensors.index.json and the {len(shards)} earlier shard(s) "
            "it names") in message, message
    assert "transformers reads" not in message
    assert message.index("model.safetensors.index.json") < message.index("model-00001-of-")
    # what it warns of: mergekit reads the first run's weights, not this one's
    new = load_file(os.path.join(out, "model.safetensors"))
    read = _read_by_mergekit(out)
    assert set(read) == set(new)
    assert any(not torch.equal(read[n], new[n]) for n in new)


def test_shards_over_an_earlier_single_file_are_warned_of_as_what_transformers_reads(
        llama_family, merge_options, tmp_path, caplog):
    paths, _ = llama_family
    out = str(tmp_path / "out")
    assert not _merge(paths, out, merge_options, caplog)
    (warning,) = _merge(paths, out, merge_options, caplog, models=["model0", "model1"], out_shard_size=20_000)
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "(model.safetensors)" in message and "transformers reads the earlier model.safetensors" in message
    assert "mergekit reads" not in message


def test_a_merge_that_replaces_every_file_or_leaves_only_unread_ones_is_not_warned_of(
        llama_family, merge_options, tmp_path, caplog):
    """The same sharding twice replaces every file: nothing said. Earlier .bin files under
    safetensors are read by neither loader: said at INFO only."""
    paths, _ = llama_family
    out = str(tmp_path / "out")
    assert not _merge(paths, out, merge_options, caplog, out_shard_size=20_000)
    assert not _merge(paths, out, merge_options, caplog, models=["model0", "model1"], out_shard_size=20_000)
    bins = str(tmp_path / "bins")
    assert not _merge(paths, bins, merge_options, caplog, safe_serialization=False)
    assert "pytorch_model.bin" in weight_files(bins)
    (said,) = _merge(paths, bins, merge_options, caplog)
    assert said.levelno == logging.INFO and "no loader reads (pytorch_model.bin)" in said.getMessage()
