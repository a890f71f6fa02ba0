"""A warning for a model whose tensor mergekit reads through a tied name where the base's
is its own, and differs from the base's tensor of that tied name: an untied base (its own
``lm_head``) with a fine-tune saved with tied embeddings (no ``lm_head``), for which
mergekit reads the fine-tune's ``embed_tokens``.
That model's ``lm_head`` task vector is then ``embed_tokens − lm_head₀``, two different
matrices rather than a fine-tuning change, and its norm, counted as the merge applies it,
can dwarf the rest of the model's and take most of the λ."""

import logging
from typing import Dict, List, Tuple

LOG = logging.getLogger("mergekit_metagpt")


def tied_against_own(run) -> Dict[Tuple[object, object], List[Tuple[str, str]]]:
    """(base, model) -> [(tensor planned, name read)] for each task of `run` where the
    model's read takes one of the tensor's tied names and the base's takes the tensor's own
    name (or an alias); a read whose name cannot be resolved here is left out."""
    found: Dict[Tuple[object, object], List[Tuple[str, str]]] = {}
    for merge_set in run.sets.values():
        for task in merge_set.tasks:
            try:
                reads = run.reads_of(task)
                base_read = reads.get(task.base_model)
                if base_read is None or _resolved_tied(base_read):
                    continue
                alike: Dict[str, bool] = {}  # tied name -> whether the base holds it alike (read once)
                tied = [(model, read) for model, read in reads.items()
                        if model != task.base_model and _resolved_tied(read)]
                for model, read in tied:
                    if read.name not in alike:
                        alike[read.name] = _base_holds_them_alike(base_read, read.name)
                    if alike[read.name]:
                        continue
                    found.setdefault((task.base_model, model), []).append(
                        (getattr(read.leaf, "tensor", read.name), read.name))
            except Exception:  # a plan the pre-pass cannot read: it says so itself
                continue
    return found


def _base_holds_them_alike(base_read, tied_name: str) -> bool:
    """Whether the base's checkpoint holds its tensor under `tied_name` too, equal to the one
    under its own name: a tied base that stores both (a ``.bin`` save, T5's ``shared`` and
    ``encoder.embed_tokens``), for which the tied model's task vector is a fine-tuning
    change. Read only where a model reads a tied name and the base its own (rare)."""
    loader = base_read.loader
    own = base_read.checkpoint_name()
    if own is None or tied_name not in loader.index.tensor_paths:
        return False
    import torch

    return torch.equal(loader.get_tensor(own), loader.get_tensor(tied_name))


def _resolved_tied(read) -> bool:
    """Whether mergekit's load of `read` resolves to one of the tensor's tied names."""
    tied = getattr(read.leaf, "tied_names", None) or ()
    if not tied:
        return False
    name = read.checkpoint_name()
    return name is not None and name in tied and name != getattr(read.leaf, "tensor", None)


def warn_of_tied_reads(run) -> None:
    """One WARNING per model whose tensors mergekit reads through a tied name where the
    base's are its own (see the module docstring)."""
    for (base, model), pairs in tied_against_own(run).items():
        listed = ", ".join(f"{planned!r} (read as {read!r})" for planned, read in pairs[:3]) + (
            f" and {len(pairs) - 3} more" if len(pairs) > 3 else "")
        LOG.warning(
            "MetaGPT: model %s has tied embeddings where the base model %s has its own %s: mergekit "
            "reads that model's tied tensor for it, so its task vector there is the difference of two "
            "different matrices, not a fine-tuning change; counted as the merge applies it, it can "
            "dominate that model's ‖δ‖² and λ (`mergekit-metagpt inspect` shows ‖δ‖² per layer)",
            model, base, listed)
