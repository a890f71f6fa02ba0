"""The merged model's config.json, mended where mergekit leaves a vocabulary size behind.

With ``tokenizer_source``/``tokenizer``, mergekit 0.1.5 writes the merged vocabulary's size
to one key of the output config, the architecture's ``vocab_size_config_key``. A multimodal
config holds it twice: Qwen2-VL, Qwen2.5-VL and Qwen3-VL-MoE's architecture files name the
top-level ``vocab_size``, which transformers 5 keeps in ``text_config``; so after a union
that grows the vocabulary, ``text_config.vocab_size`` keeps the base's, and transformers
cannot load the model (the embeddings are re-initialised as mismatched, or refused). Stock
methods write the same config. For a MetaGPT merge, a vocabulary size of the config's language
model (``TEXT_SECTIONS``, or top-level) that differs from the rows of the merged, token-aligned
tensors, where another of its sizes matches them (the one mergekit set), is set to them, with a
WARNING saying so.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional, Set, Tuple

LOG = logging.getLogger("mergekit_metagpt")


def mend_vocab_sizes(context) -> None:
    """After a MetaGPT ``run_merge`` that built a tokenizer has written its output: see the
    module docstring. Anything not as expected (no config, tensors of several row counts, no
    size that matches) is left as mergekit wrote it."""
    config = context.config
    if context.out_path is None or not (getattr(config, "tokenizer_source", None) or getattr(config, "tokenizer", None)):
        return
    folder = os.fspath(context.out_path)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):  # none written: nothing to mend
        return
    try:
        rows = _aligned_rows(context, folder)
        with open(path, encoding="utf-8") as f:
            written = json.load(f)
        if not isinstance(written, dict):
            return
    except Exception as error:  # a merge written is no merge failed: said, not raised
        LOG.warning("MetaGPT: the vocabulary sizes of the merged model's config.json were not checked (%s: %s)",
                    type(error).__name__, error)
        return
    sizes = _vocab_sizes(written)
    count = next(iter(rows)) if len(rows) == 1 else None
    if count not in sizes.values():  # mergekit set none to the merged rows: not ours to guess
        if len(set(sizes.values())) > 1:
            LOG.warning("MetaGPT: the merged model's config.json has vocabulary sizes that differ (%s; its token "
                        "embeddings' rows: %s): transformers reads one of them, so check that it is the rows'",
                        ", ".join(f"{_dotted(key)} {value}" for key, value in sizes.items()),
                        ", ".join(map(str, sorted(rows))) or "not read (not a safetensors output)")
        return
    stale = {key: value for key, value in sizes.items() if value != count}
    if not stale:
        return
    for (section, key), _ in stale.items():
        (written[section] if section else written)[key] = count
    from mergekit_metagpt.atomic_files import write_atomically

    def write(f):
        f.write(json.dumps(written, indent=2, sort_keys=True) + "\n")

    shown = ", ".join(f"{_dotted(key)} {value}" for key, value in stale.items())
    try:
        write_atomically(path, write)
    except Exception as error:
        LOG.warning("MetaGPT: the merged model's config.json has %s, where its token embeddings have %d rows "
                    "(mergekit 0.1.5 sets one vocabulary size of a multimodal config); it could not be set to %d "
                    "(%s): set it by hand, or transformers cannot load the model", shown, count, count, error)
        return
    LOG.warning("MetaGPT: the merged model's config.json had %s, where its token embeddings have %d rows (mergekit "
                "0.1.5 sets only one vocabulary size of a multimodal config, here %s): set to %d, so that transformers "
                "loads the model", shown, count,
                ", ".join(_dotted(key) for key, value in sizes.items() if value == count), count)


#: The sections of a multimodal config that hold its language model's settings (transformers'
#: ``text_config``; ``language_config``, ``llm_config`` in some remote-code models). Others
#: (a vision or audio tower's) may have a vocab_size of their own, a codebook's: never touched.
TEXT_SECTIONS = ("text_config", "language_config", "llm_config")


def _vocab_sizes(config: dict) -> Dict[Tuple[Optional[str], str], int]:
    """The config's vocabulary sizes of its language model: the top-level ``vocab_size`` and
    that of each ``TEXT_SECTIONS`` section, {(section or None, key): value}."""
    sizes = {}
    if type(config.get("vocab_size")) is int:
        sizes[(None, "vocab_size")] = config["vocab_size"]
    for section in TEXT_SECTIONS:
        value = config.get(section)
        if isinstance(value, dict) and type(value.get("vocab_size")) is int:
            sizes[(section, "vocab_size")] = value["vocab_size"]
    return sizes


def _dotted(key: Tuple[Optional[str], str]) -> str:
    section, name = key
    return f"{section}.{name}" if section else name


def _aligned_rows(context, folder: str) -> Set[int]:
    """The row counts, along their vocabulary axis, of the merged tensors the plans aligned to
    the merged vocabulary, from the output's safetensors headers (nothing read)."""
    from mergekit_metagpt.plan_inputs import vocabulary_adapter

    axes: Dict[str, int] = {}
    for run in context.runs:
        for merge_set in run.sets.values():
            for task in merge_set.tasks:
                if vocabulary_adapter(task) is not None:
                    axis = getattr(task.output_weight, "vocabulary_axis", None)
                    axes[task.output_weight.name] = 0 if axis is None else axis
    rows: Set[int] = set()
    if not axes:
        return rows
    # the files mergekit wrote (its index's, or its one model.safetensors), found as its loader
    # finds a model's, not whatever else the folder holds; none read for a .bin output
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    from mergekit_metagpt.checkpoint_files import stored_shape

    index = ShardedTensorIndex.from_disk(folder)
    if not index.is_safetensors:
        return rows
    for name, axis in axes.items():
        if name in index.tensor_paths:
            shape = stored_shape(os.path.join(folder, index.tensor_paths[name]), name)
            if len(shape) > axis:
                rows.add(int(shape[axis]))
    return rows
