"""The ``metagpt`` merge method: task arithmetic with λ_t = ‖δ_t‖² / Σ_k ‖δ_k‖²."""

from __future__ import annotations

import contextvars
import logging
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    BatchOptions,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_metagpt.coefficients import Coefficients
from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.norms import in_memory_norms, total
from mergekit_metagpt.parameters import (
    NonNegativeFloat,
    check_parameter_names,
    planned_config,
)

LOG = logging.getLogger("mergekit_metagpt")

PAPER_URL = "https://arxiv.org/abs/2406.11385"

# Set while an in-memory call (merge_state_dicts, merge_tensors, direct __call__)
# executes: that call hands the method every tensor group at once, so the global
# norms come from those groups, not from checkpoints on disk.
_IN_MEMORY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mergekit_metagpt_in_memory", default=False
)


class MetaGPTMerge(GroupMergeMethod):
    """MetaGPT (Zhou et al., 2024): data-free, closed-form task-arithmetic weights."""

    def __init__(self, name: str = "metagpt", pretty_name: str = "MetaGPT"):
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=pretty_name,
            reference_url=PAPER_URL,
            parameters=(
                ParameterSpec(
                    "lambda",
                    NonNegativeFloat,
                    ParameterScope.SHARED,
                    default=1.0,
                    description="Overall scale on the merged task vector",
                ),
            ),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        )

    # -- entry points -------------------------------------------------------
    def __call__(self, groups, /, **kwargs):
        token = _IN_MEMORY.set(True)
        try:
            return super().__call__(groups, **kwargs)
        finally:
            _IN_MEMORY.reset(token)

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        if base_id is None:
            raise MetaGPTError(
                f"MetaGPT needs a base_model (the pre-trained model the fine-tunes "
                f"share){' for ' + group_name if group_name else ''}"
            )
        non_base = [i for i in input_ids if i != base_id]
        if base_id in input_ids and not non_base:
            raise MetaGPTError(
                f"MetaGPT needs at least one model besides the base model {base_id}"
                f"{' for ' + group_name if group_name else ''}"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        check_parameter_names(
            planned_config(), self.spec.name, (p.name for p in self.spec.parameters)
        )

    def _execute(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        options: BatchOptions,
        *,
        input_dtypes: Sequence[Optional[torch.dtype]],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, ...]:
        if _IN_MEMORY.get():
            norms = in_memory_norms(groups)
            coefficients = Coefficients.from_norms({m: total(v) for m, v in norms.items()})
            coefficients.log("in-memory merge")
            lambdas = [coefficients.lambdas] * len(groups)
        else:
            lambdas = [self._graph_lambdas(group) for group in groups]
        parameters = [dict(p, _lambdas=lams) for p, lams in zip(parameters, lambdas)]
        return super()._execute(
            groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype
        )

    def _graph_lambdas(self, group: TensorGroup) -> Dict[Hashable, float]:
        from mergekit_metagpt.prepass import checkpoint_norms

        if group.base is None:
            raise MetaGPTError(
                f"MetaGPT: the base model has no tensor {group.metadata.name!r}"
            )
        models = [entry.id for entry in group.non_base]
        norms = checkpoint_norms(group.base.id, models, group.base.tensor.device)
        coefficients = Coefficients.from_norms({m: total(norms[m]) for m in models})
        _log_once(group.base.id, coefficients)
        return coefficients.lambdas

    # -- the merge of one tensor ---------------------------------------------
    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        lambdas: Dict[Hashable, float] = parameters["_lambdas"]
        scale = float(parameters["lambda"])
        base = group.base.tensor
        compute = torch.promote_types(base.dtype, torch.float32)
        base_c = base.to(compute)
        merged = torch.zeros_like(base_c)
        for entry in group.non_base:
            weight = lambdas[entry.id] * scale
            if weight != 0.0:
                merged.add_(entry.tensor.to(compute) - base_c, alpha=weight)
        merged.add_(base_c)
        return merged.to(base.dtype)


_LOGGED = set()


def _log_once(base, coefficients: Coefficients) -> None:
    key = (base, coefficients)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    coefficients.log(f"base {base}")
