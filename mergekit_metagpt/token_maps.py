"""A check of mergekit's token maps (``tokenizer_source``), before any embedding is aligned.

mergekit 0.1.5's ``build_tokenizer`` maps each token of the merged vocabulary to its row in
each model's embeddings, or to -1 where the model lacks the token. A token whose id in a
model's tokenizer is at or past that model's ``vocab_size`` (a tokenizer with more tokens than
its embeddings have rows) it leaves out of the model's map altogether, after a warning
("has index 64>63 (padding?)"), and aligning the embeddings then fails with a bare
``KeyError: 64``. Where mergekit cannot read the ``vocab_size`` (an architecture whose
``vocab_size`` key the config lacks: "Unable to get vocab size"), it keeps such a token in
the map, with a row past the embeddings' last, and aligning fails with a bare ``IndexError``.
For a MetaGPT merge (and its ``coefficients``, ``inspect``, ``bake``), both are named, with
the model and its tokens (and the tensor, for the second), as soon as the maps are built."""

import os
from typing import Dict, Hashable, Optional, Set, Tuple

from mergekit_metagpt.errors import MetaGPTError

#: tokens named in the message (the rest counted)
SHOWN = 3


def aligned_models(found) -> Optional[Set[Hashable]]:
    """The models whose tensors the alignments `found` (``aligned_reads``) align (a slices
    recipe's embeddings come from its first and last slices' models only); None where that
    is not known (then every model counts)."""
    return None if found is None else {model for _, reads in found for model in reads}


def forced_tokens(found) -> Set[str]:
    """The tokens the recipe's ``tokenizer: tokens:`` forces (``force: true``) in the
    alignments `found`: mergekit reads no model's own row for them."""
    forced: Set[str] = set()
    for task, _ in found or []:
        tokens = getattr(task.gather_tensors, "tokens", None) or {}
        try:
            forced.update(token for token, config in dict(tokens.items()).items() if getattr(config, "force", False))
        except Exception:  # not shaped as 0.1.5's: none taken as forced
            continue
    return forced


def embedding_rows(found) -> Dict[Hashable, Tuple[int, str]]:
    """Each aligned model's fewest rows along the vocabulary axis over the tensors the
    alignments `found` align (their names: from the checkpoint files' headers, nothing
    read), with that tensor's name; a model whose shapes are not known so is left out."""
    rows: Dict[Hashable, Tuple[int, str]] = {}
    for task, reads in found or []:
        axis = getattr(task.output_weight, "vocabulary_axis", None)
        for model, read in reads.items():
            found = _rows(read, 0 if axis is None else axis)
            if found is not None and (model not in rows or found[0] < rows[model][0]):
                rows[model] = found
    return rows


def aligned_reads(run, tokenizer_task):
    """(task, its reads by model) of each task of the MetaGPT plan `run` whose vocabulary
    adapter is built on `tokenizer_task`; None where that is not known."""
    if run is None:
        return None
    from mergekit_metagpt.plan_inputs import vocabulary_adapter

    found = []
    try:
        for merge_set in run.sets.values():
            for task in merge_set.tasks:
                adapter = vocabulary_adapter(task)
                if adapter is not None and any(t == tokenizer_task for t in adapter.inputs.values()):
                    found.append((task, run.reads_of(task)))
    except Exception:  # a plan the pre-pass cannot read: it says so itself
        return None
    return found


def _rows(read, axis: int) -> Optional[Tuple[int, str]]:
    """(size along `axis`, name) of the tensor `read` takes, from its safetensors file's
    header; None where not known so (a pickle, a tensor the checkpoint lacks)."""
    try:
        name = read.checkpoint_name()
        index = read.loader.index
        if name is None or not index.is_safetensors:
            return None
        from mergekit_metagpt.checkpoint_files import stored_shape

        shape = stored_shape(os.path.join(index.base_path, index.tensor_paths[name]), name)
        return (int(shape[axis]), name) if len(shape) > axis else None
    except Exception:  # the merge's own reads say what is wrong with the file
        return None


def check_token_maps(info, models: Optional[Set[Hashable]] = None,
                     rows: Optional[Dict[Hashable, Tuple[int, str]]] = None, forced: Set[str] = frozenset()) -> None:
    """Refuse a tokenizer build (mergekit's ``TokenizerInfo``) whose token map of a model
    (of `models`, where given: those whose tensors are aligned) lacks tokens of the merged
    vocabulary, or maps some to a row at or past the rows of the model's aligned tensor
    (`rows`: ``embedding_rows``; a token the recipe forces, whose row mergekit does not
    read, is not checked so), see the module docstring. Anything not shaped like
    0.1.5's ``TokenizerInfo`` passes unchecked (mergekit then reports what it finds)."""
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
        own = originals.get(model) or {}
        if not missing:
            _check_rows(model, token_map, vocab, own, (rows or {}).get(model), forced)
            continue
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


def _check_rows(model, token_map, vocab, own, rows: Optional[Tuple[int, str]], forced=frozenset()) -> None:
    """A model's token map pointing past the rows of its aligned tensor (`rows`: count, name)."""
    if rows is None:
        return
    count, name = rows
    tokens = {index: token for token, index in vocab.items()}
    past = sorted((row, tokens.get(index, index)) for index, row in token_map.items()
                  if isinstance(row, int) and row >= count and tokens.get(index) not in forced)
    if not past:
        return
    listed = ", ".join(f"{token!r} (id {row} in its tokenizer)" for row, token in past[:SHOWN]) + (
        f" and {len(past) - SHOWN} more" if len(past) > SHOWN else "")
    raise MetaGPTError(
        f"MetaGPT: model {model}'s tokenizer has token(s) past the {count} rows of its tensor {name!r}: "
        f"{listed}. mergekit 0.1.5 keeps the tokens below the vocab_size it reads from the model's config "
        f"(where it reads none, \"Unable to get vocab size\", below the tokenizer's size), and aligning the "
        f"token embeddings then fails (IndexError: index {past[0][0]} is out of bounds). Give that model a "
        f"tokenizer without them, or embeddings with rows for them and a vocab_size to match"
    )
