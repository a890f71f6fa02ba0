"""A check of mergekit's token maps (``tokenizer_source``), before any embedding is aligned.

mergekit 0.1.5's ``build_tokenizer`` maps each token of the merged vocabulary to its row in
each model's embeddings, or to -1 where the model lacks the token. A token whose id in a
model's tokenizer is at or past that model's ``vocab_size`` (a tokenizer with more tokens than
its embeddings have rows) it leaves out of the model's map altogether, after a warning
("has index 64>63 (padding?)"), and aligning the embeddings then fails with a bare
``KeyError: 64``. For a MetaGPT merge (and its ``coefficients``, ``inspect``, ``bake``), this
names the model and its tokens instead, as soon as the maps are built."""

from typing import Hashable, Optional, Set

from mergekit_metagpt.errors import MetaGPTError

#: tokens named in the message (the rest counted)
SHOWN = 3


def aligned_models(run, tokenizer_task) -> Optional[Set[Hashable]]:
    """The models whose tensors the vocabulary adapters built on `tokenizer_task` align, in
    the MetaGPT plan `run` (a slices recipe's embeddings come from its first and last slices'
    models only); None where that is not known (then every model counts)."""
    if run is None:
        return None
    from mergekit_metagpt.plan_inputs import vocabulary_adapter

    models: Set[Hashable] = set()
    try:
        for merge_set in run.sets.values():
            for task in merge_set.tasks:
                adapter = vocabulary_adapter(task)
                if adapter is not None and any(t == tokenizer_task for t in adapter.inputs.values()):
                    models.update(run.reads_of(task))
    except Exception:  # a plan the pre-pass cannot read: it says so itself
        return None
    return models


def check_token_maps(info, models: Optional[Set[Hashable]] = None) -> None:
    """Refuse a tokenizer build (mergekit's ``TokenizerInfo``) whose token map of a model
    (of `models`, where given: those whose tensors are aligned) lacks tokens of the merged
    vocabulary (see the module docstring). Anything not shaped like 0.1.5's
    ``TokenizerInfo`` passes unchecked (mergekit then reports what it finds)."""
    permutations = getattr(info, "permutations", None)
    tokenizer = getattr(info, "tokenizer", None)
    if not isinstance(permutations, dict) or not hasattr(tokenizer, "get_vocab"):
        return
    vocab = tokenizer.get_vocab()
    originals = getattr(info, "original_vocabs", None) or {}
    for model, token_map in permutations.items():
        if not isinstance(token_map, dict):
            return
        if models is not None and model not in models:
            continue
        missing = sorted((index, token) for token, index in vocab.items() if index not in token_map)
        if not missing:
            continue
        own = originals.get(model) or {}
        listed = ", ".join(
            f"{token!r} (id {own[token]} in its tokenizer)" if token in own else repr(token)
            for _, token in missing[:SHOWN]
        ) + (f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else "")
        raise MetaGPTError(
            f"MetaGPT: model {model}'s tokenizer has token(s) at or past the vocab_size of its "
            f"config.json, beyond the rows of its embeddings: {listed}. mergekit 0.1.5 leaves them "
            f"out of the model's token map, and aligning the token embeddings (embed_tokens, "
            f"lm_head) then fails (KeyError: {missing[0][0]}). Give that model a tokenizer without "
            f"them, or embeddings with rows for them and a vocab_size to match"
        )
