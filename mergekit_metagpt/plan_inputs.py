"""What one planned merge task reads from each model, taken from mergekit's own plan.

An ``ExecuteMergeMethodTask``'s input task maps each model to a leaf load task
(``LoadTensor`` for model folders, ``SimpleLoadTensor`` for ``mergekit-pytorch``'s raw
files). The leaves carry mergekit's resolution of the tensor (name, aliases, tied
names, dtype, device); executing one reads the tensor exactly as the merge does.
Vocabulary adapters (``PermutedVocabulary``, ``TruncatedVocabulary``) wrap a
``GatherTensors``: the norms read the gathered tensors and count the rows that base
and model both have (see ``prepass``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Dict, Hashable, Optional

import torch

from mergekit_metagpt.errors import MetaGPTError


@dataclass(frozen=True)
class TensorRead:
    """One model's input to one planned task."""

    model: Hashable  # the TensorEntry.id the method sees (a ModelReference)
    leaf: object  # mergekit's leaf load task

    @functools.cached_property
    def key(self) -> str:
        """What is read, independent of which checkpoint: the leaf's settings."""
        fields = self.leaf.model_dump(mode="json", exclude={"model", "device", "per_gpu"})
        return json.dumps([type(self.leaf).__name__, fields], sort_keys=True)

    @property
    def loader(self):
        """mergekit's LazyTensorLoader for this model (shared with the merge)."""
        model = self.leaf.model
        if isinstance(model, str):  # mergekit-pytorch's raw files
            from mergekit.scripts.merge_raw_pytorch import SimpleLoaderCache

            return SimpleLoaderCache().get(model)
        from mergekit.io.tasks import LoaderCache

        return LoaderCache().get(model)

    @property
    def name(self) -> str:
        """The checkpoint's tensor name, as resolved by mergekit where it can say."""
        label = None
        group_label = getattr(self.leaf, "group_label", None)
        if callable(group_label):
            try:
                label = group_label()
            except Exception:
                label = None
        return label or getattr(self.leaf, "tensor", None) or getattr(self.leaf, "tensor_name", "?")

    def order(self) -> tuple:
        """Sort key: shard file, then name (each shard is visited once per model)."""
        name = self.name
        return (self.loader.index.tensor_paths.get(name, ""), name)

    def load(self) -> Optional[torch.Tensor]:
        return self.leaf.execute()


def task_reads(task) -> Dict[Hashable, TensorRead]:
    """Each model's TensorRead for one ExecuteMergeMethodTask, via mergekit's own mapping."""
    source = task.gather_tensors
    inner = getattr(source, "gather_tensors", None)  # vocabulary adapters
    if inner is not None:
        source = inner
    leaves = source.arguments()
    if any(leaf.arguments() for leaf in leaves.values()):
        raise MetaGPTError(
            f"MetaGPT: cannot read the inputs of {task.output_weight.name!r}: "
            f"{type(source).__name__} has nested inputs the pre-pass does not know"
        )
    # The input task's own execute() turns its argument names into model ids; handed
    # the leaf tasks in place of tensors, it returns {model id: leaf task}.
    mapping = source.execute(**leaves)
    if not isinstance(mapping, dict) or not all(hasattr(v, "execute") for v in mapping.values()):
        raise MetaGPTError(
            f"MetaGPT: cannot read the inputs of {task.output_weight.name!r} "
            f"({type(source).__name__})"
        )
    return {model: TensorRead(model, leaf) for model, leaf in mapping.items()}
