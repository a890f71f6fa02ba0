"""The ``metagpt`` merge method: task arithmetic with λ_t = ‖δ_t‖² / Σ_k ‖δ_k‖²."""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from typing_extensions import Literal

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    BatchOptions,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_metagpt.coefficients import Coefficients
from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.norms import Sparsifier, in_memory_norms, total
from mergekit_metagpt.scratch import chunks, thread_scratch
from mergekit_metagpt.parameters import (
    Density,
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


# The variants delegate each tensor's merge to mergekit's own registered method:
# its sparsification and sign consensus, with weight = λ_t and normalize = false.
VARIANTS = {
    "metagpt": None,
    "metagpt_ties": "ties",
    "metagpt_dare": "dare_linear",
}
PRETTY = {"metagpt": "MetaGPT", "metagpt_ties": "MetaGPT + TIES", "metagpt_dare": "MetaGPT + DARE"}


class MetaGPTMerge(GroupMergeMethod):
    """MetaGPT (Zhou et al., 2024): data-free, closed-form task-arithmetic weights."""

    def __init__(self, name: str = "metagpt"):
        self.delegate_name = VARIANTS[name]
        parameters = [
            ParameterSpec(
                "lambda",
                NonNegativeFloat,
                ParameterScope.SHARED,
                default=1.0,
                description="Overall scale on the merged task vector",
            ),
            ParameterSpec(
                "granularity",
                Literal["global", "per_tensor"],
                ParameterScope.SHARED,
                default="global",
                description="Sum norms over the whole model (the paper) or per tensor",
            ),
        ]
        if self.delegate_name:
            parameters += [
                ParameterSpec("density", Density, ParameterScope.NON_BASE, default=1.0,
                              description="Fraction of each task vector kept"),
                ParameterSpec("lambda_from", Literal["dense", "sparse"], ParameterScope.SHARED,
                              default="dense",
                              description="Norms of the dense or of the sparsified task vectors"),
            ]
        if self.delegate_name == "ties":
            parameters.append(ParameterSpec("int8_mask", bool, ParameterScope.SHARED, default=False))
        if self.delegate_name == "dare_linear":
            parameters.append(ParameterSpec("rescale", bool, ParameterScope.SHARED, default=True))
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=PRETTY[name],
            reference_url=PAPER_URL,
            parameters=tuple(parameters),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        )

    def delegate(self):
        from mergekit.merge_methods import registry

        return registry.get(self.delegate_name)

    def sparsifier(self, params: Dict[str, Any]) -> Optional["Sparsifier"]:
        """The transform whose output norms give λ when lambda_from is sparse."""
        if not self.delegate_name or params.get("lambda_from") != "sparse":
            return None
        delegate = self.delegate()
        return Sparsifier(
            method=delegate.sparsification_method,
            rescale=bool(params.get("rescale", delegate.default_rescale)),
            densities=tuple(sorted((str(k), float(v)) for k, v in params["density"].items())),
            by_model=dict(params["density"].items()),
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
        granularity = parameters[0]["granularity"] if parameters else "global"
        if granularity == "per_tensor":
            lambdas = [
                self._lambdas(in_memory_norms([g], self.sparsifier(p))) for g, p in zip(groups, parameters)
            ]
        elif _IN_MEMORY.get():
            norms = in_memory_norms(groups, self.sparsifier(parameters[0]) if parameters else None)
            coefficients = self._coefficients(norms)
            coefficients.log("in-memory merge")
            lambdas = [coefficients.lambdas] * len(groups)
        else:
            lambdas = [self._graph_lambdas(g, p) for g, p in zip(groups, parameters)]
        parameters = [dict(p, _lambdas=lams) for p, lams in zip(parameters, lambdas)]
        return super()._execute(
            groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype
        )

    @staticmethod
    def _coefficients(norms) -> Coefficients:
        return Coefficients.from_norms({m: total(v) for m, v in norms.items()})

    def _lambdas(self, norms) -> Dict[Hashable, float]:
        return self._coefficients(norms).lambdas

    def _graph_lambdas(self, group: TensorGroup, params: Dict[str, Any]) -> Dict[Hashable, float]:
        from mergekit_metagpt.prepass import checkpoint_norms

        if group.base is None:
            raise MetaGPTError(
                f"MetaGPT: the base model has no tensor {group.metadata.name!r}"
            )
        models = [entry.id for entry in group.non_base]
        norms = checkpoint_norms(
            group.base.id, models, group.base.tensor.device, self.sparsifier(params)
        )
        coefficients = self._coefficients({m: norms[m] for m in models})
        _log_once(self.spec.name, group.base.id, coefficients)
        return coefficients.lambdas

    # -- the merge of one tensor ---------------------------------------------
    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        lambdas: Dict[Hashable, float] = parameters["_lambdas"]
        scale = float(parameters["lambda"])
        if self.delegate_name:
            return self._merge_with_delegate(group, lambdas, scale, parameters)
        base = group.base.tensor
        compute = torch.promote_types(base.dtype, torch.float32)
        weights = [(e.tensor.reshape(-1), lambdas[e.id] * scale) for e in group.non_base]
        weights = [(x, w) for x, w in weights if w != 0.0]
        scratch = thread_scratch()
        out = torch.empty_like(base)
        flat_base, flat_out = base.reshape(-1), out.view(-1)
        # θ₀ + Σ w_t (θ_t − θ₀) in float32, one chunk at a time into the output tensor
        for start, end in chunks(flat_base.numel()):
            n = end - start
            base_c = scratch.flat("merge_base", n, base.device, compute).copy_(flat_base[start:end])
            merged = scratch.flat("merge_sum", n, base.device, compute).zero_()
            delta = scratch.flat("merge_delta", n, base.device, compute)
            for x, weight in weights:
                merged.add_(delta.copy_(x[start:end]).sub_(base_c), alpha=weight)
            flat_out[start:end].copy_(merged.add_(base_c))
        return out

    def _merge_with_delegate(self, group, lambdas, scale, parameters) -> torch.Tensor:
        delegate = self.delegate()
        ids = [entry.id for entry in group.non_base]
        kwargs = {
            "int8_mask": parameters.get("int8_mask", False),
            "normalize": False,
            "rescale": parameters.get("rescale", delegate.default_rescale),
            "lambda": scale,
            "weight": PerInputValues([(i, lambdas[i]) for i in ids]),
            "density": PerInputValues([(i, parameters["density"][i]) for i in ids]),
        }
        return delegate.merge_group(group, **kwargs)


_LOGGED = set()
_LOGGED_LOCK = threading.Lock()


def _log_once(method: str, base, coefficients: Coefficients) -> None:
    """Log the table and write the record once per merge run (not once per tensor)."""
    from mergekit_metagpt.record import running_merge, schedule_card_update, write_record

    running = running_merge()
    key = (method, base, coefficients, running.key if running else None)
    with _LOGGED_LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    coefficients.log(f"{method}, base {base}")
    write_record(method, base, coefficients, running)
    if running is not None:
        schedule_card_update(running.out_path, PRETTY[method], coefficients)
