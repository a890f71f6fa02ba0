"""Tensors that are not floating point (integer or bool buffers: ``num_batches_tracked``,
a causal mask), which no merge method merges: mergekit copies one that all inputs agree on,
and stops at one that differs ("Non-floating buffer … differs between inputs", naming no
model), in whatever order its executor reaches the tensors, possibly after the λ are out.
For a MetaGPT merge the model and tensor are named, by the pre-pass where it reads the
tensor first and by the merge's task where the merge does."""

from typing import Dict, Hashable, Optional

import torch

from mergekit_metagpt.errors import MetaGPTError


def refuse_other_buffer(name, model, tensor: Optional[torch.Tensor], base_tensor: torch.Tensor, base) -> None:
    """A model's copy of a tensor the base stores as not floating point, where it differs
    (in dtype, shape or value); None (a tensor the model lacks) passes."""
    if tensor is None or (tensor.dtype == base_tensor.dtype and torch.equal(tensor, base_tensor)):
        return
    if tensor.dtype != base_tensor.dtype:
        how = f"is {tensor.dtype} where the base's is {base_tensor.dtype}"
    elif tensor.shape != base_tensor.shape:
        how = f"has shape {tuple(tensor.shape)} where the base's has {tuple(base_tensor.shape)}"
    else:
        how = "differs from the base's"
    raise MetaGPTError(
        f"MetaGPT: tensor {name!r} of model {model} {how}, and the base model {base} stores it as "
        f"{base_tensor.dtype}: mergekit merges no tensor that is not floating point, it copies one all "
        f"inputs agree on (stock methods stop mid-merge: 'Non-floating buffer … differs'); make the "
        f"models' copies equal to the base's before merging"
    )


def refuse_unequal_buffers(name, tensors: Dict[Hashable, torch.Tensor], base) -> None:
    """The inputs of one merge task (`tensors`, by model) where the base's is not floating
    point and another's differs; or where the base's is and another's is not."""
    if not isinstance(tensors, dict):
        return
    base_tensor = tensors.get(base)
    if not isinstance(base_tensor, torch.Tensor):
        return
    for model, tensor in tensors.items():
        if model == base or not isinstance(tensor, torch.Tensor):
            continue
        if not base_tensor.is_floating_point():
            refuse_other_buffer(name, model, tensor, base_tensor, base)
        else:
            refuse_not_floating(name, model, tensor, base)


def refuse_not_floating(name, model, tensor: torch.Tensor, base) -> None:
    """A model's copy of a tensor the base stores as floating point, where it is not."""
    if not tensor.is_floating_point():
        raise MetaGPTError(f"MetaGPT: tensor {name!r} of model {model} is {tensor.dtype}, "
                           f"but floating point in the base model {base}")
