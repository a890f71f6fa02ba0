"""The ``metagpt`` merge method: task arithmetic with λ_t = ‖δ_t‖² / Σ_k ‖δ_k‖²."""

from __future__ import annotations

import contextvars
import logging
from typing import Any, Dict, Hashable, List, Literal, Mapping, Optional, Sequence, Tuple

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
from mergekit_metagpt import PAPER_URL
from mergekit_metagpt.errors import MetaGPTError, base_lacks
from mergekit_metagpt.merge_plan import uniform_alpha, uniform_lambda_from
from mergekit_metagpt.norms import Sparsifier, in_memory_norms, no_autocast, total, work_dtype
from mergekit_metagpt.scratch import chunks, thread_scratch
from mergekit_metagpt.parameters import Alpha, Density, NonNegativeFloat

LOG = logging.getLogger("mergekit_metagpt")


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
    "metagpt_dare_ties": "dare_ties",
}
#: The variants that elect signs (TIES's consensus: ``int8_mask``) and that drop at random
#: (DARE: ``rescale``, and masks a seed makes reproducible).
SIGN_ELECTION = {"metagpt_ties", "metagpt_dare_ties"}
RANDOM_DROP = {"metagpt_dare", "metagpt_dare_ties"}


def meant_variant(name) -> Optional[str]:
    """The variant a merge_method spelt otherwise names (``MetaGPT``, ``metagpt-ties``, or a
    typo close to one: ``metagtp``), or None."""
    if not isinstance(name, str):
        return None
    meant = name.strip().lower().replace("-", "_").replace(" ", "_")
    if meant not in VARIANTS:  # a typo: metagtp, meta_gpt, metagpt_tie
        import difflib

        close = difflib.get_close_matches(meant, list(VARIANTS), n=1, cutoff=0.85)  # not metagpt_della
        meant = close[0] if close else meant
    return meant if meant in VARIANTS and meant != name else None


PRETTY = {"metagpt": "MetaGPT", "metagpt_ties": "MetaGPT + TIES", "metagpt_dare": "MetaGPT + DARE",
          "metagpt_dare_ties": "MetaGPT + DARE-TIES"}


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
            ParameterSpec(
                "alpha",
                Alpha,
                ParameterScope.SHARED,
                default=1.0,
                description="Tempering exponent: λ_t ∝ (‖δ_t‖²)^alpha; 1 is the paper, 0 the average",
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
        if name in SIGN_ELECTION:
            parameters.append(ParameterSpec("int8_mask", bool, ParameterScope.SHARED, default=False))
        if name in RANDOM_DROP:
            parameters.append(ParameterSpec("rescale", bool, ParameterScope.SHARED, default=True))
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=PRETTY[name],
            reference_url=PAPER_URL,
            parameters=tuple(parameters),
            contract=InputContract(base=BasePolicy.REQUIRED),
        )

    def delegate(self):
        from mergekit.merge_methods import registry

        return registry.get(self.delegate_name)

    def sparsifier(self, params: Dict[str, Any]) -> Optional[Sparsifier]:
        """The transform whose output norms give λ when lambda_from is sparse."""
        if not self.delegate_name or params.get("lambda_from") != "sparse":
            return None
        delegate = self.delegate()
        return Sparsifier(
            method=delegate.sparsification_method,
            rescale=bool(params.get("rescale", delegate.default_rescale)),
            by_model=dict(params["density"].items()),
        )

    # -- entry points -------------------------------------------------------
    def __call__(self, groups, /, **kwargs):
        parameters = kwargs.get("parameters")
        if isinstance(parameters, Mapping):  # as recipes are refused: with why, for weight & co
            from mergekit_metagpt.recipe_checks import normalize_is_off, unknown_parameters_message

            if "normalize" in parameters:
                if not normalize_is_off(parameters["normalize"]):
                    from mergekit_metagpt.recipe_checks import NORMALIZE_HELP

                    raise MetaGPTError(f"normalize must be false for {self.spec.name}, or left out (got "
                                       f"{parameters['normalize']!r}): {NORMALIZE_HELP}")
                # what MetaGPT does: accepted, as in recipes (mergekit would refuse the name)
                kwargs["parameters"] = parameters = {k: v for k, v in parameters.items() if k != "normalize"}
            known = {p.name for p in self.spec.parameters}
            unknown = set(parameters) - known
            if unknown:
                raise MetaGPTError(unknown_parameters_message(self.spec.name, unknown, known, in_memory=True))
        token = _IN_MEMORY.set(True)
        try:
            return super().__call__(groups, **kwargs)
        finally:
            _IN_MEMORY.reset(token)

    def _bind_group_parameters(self, group, supplied, group_index, group_count):
        try:
            return super()._bind_group_parameters(group, supplied, group_index, group_count)
        except ValueError as error:  # pydantic's: names neither the parameter, nor model or tensor
            if isinstance(error, MetaGPTError):
                raise
            named = self._named_bad_value(group, supplied, group_index, group_count)
            if named is None:
                raise
            raise named from error

    def _named_bad_value(self, group, supplied, group_index, group_count) -> Optional[MetaGPTError]:
        """The first bad value of an in-memory merge's `supplied` parameters for one tensor
        group, named with its parameter, tensor and model (mergekit's binding raises
        pydantic's message alone); None where none is found (mergekit's error stands)."""
        from mergekit.merge_methods.base import PerGroupValues

        tensor = getattr(getattr(group, "metadata", None), "name", None)
        where = f"tensor {tensor!r}" if tensor else f"tensor group {group_index + 1} of {group_count}"
        for spec in self.spec.parameters:
            if spec.name not in supplied:
                continue
            value = supplied[spec.name]
            if isinstance(value, PerGroupValues):
                if len(value.values) != group_count:
                    return None
                value = value.values[group_index]
            entries = group.non_base if spec.scope == ParameterScope.NON_BASE else group.entries
            if spec.scope == ParameterScope.SHARED:
                given = [(None, value)]
            elif isinstance(value, Mapping):  # by model
                given = [(e.id, value[e.id]) for e in entries if e.id in value]
            elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # in input order
                if len(value) != len(entries):  # mergekit's own message says so
                    return None
                given = list(zip([e.id for e in entries], value))
            else:  # one value for every model
                given = [(None, value)]
            for model, raw in given:
                try:
                    spec.validate(raw)
                except ValueError as error:
                    errors = getattr(error, "errors", None)
                    message = errors()[0].get("msg", str(error)) if callable(errors) else str(error)
                    message = message.removeprefix("MetaGPT: ")
                    of_model = f"model {model}, " if model is not None else ""
                    if not message.startswith(f"parameter {spec.name}"):
                        message = f"parameter {spec.name}: {message}"
                    return MetaGPTError(f"MetaGPT: {message} ({of_model}{where}; got {raw!r})")
        return None

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        # A group of the base alone (a frankenmerge slice that keeps base layers) is
        # passed through, as stock task_arithmetic does; a merge in which no group has
        # another model is refused where the whole plan is known (merge_plan.MergeRun).
        if base_id is None:
            raise MetaGPTError(
                f"MetaGPT needs a base_model (the pre-trained model the fine-tunes "
                f"share){' for ' + group_name if group_name else ''}"
            )
        from mergekit_metagpt.integration import CURRENT_TASK

        if CURRENT_TASK.get() is not None and base_id not in input_ids and input_ids:
            # merging: the loader left out the base's tensor, which the base lacks (e.g.
            # mergekit-pytorch --tensor-union). The pre-pass says the same, but this task may
            # be the first to run, and mergekit's check comes before the method's work
            raise base_lacks(base_id, group_name, input_ids)
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def _execute(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        options: BatchOptions,
        *,
        input_dtypes: Sequence[Optional[torch.dtype]],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, ...]:
        from mergekit.merge_methods.dtype import align_dtype

        lambdas = self._lambdas_for(groups, parameters, input_dtypes)
        results = []
        for group, params, lams, dtype in zip(groups, parameters, lambdas, input_dtypes):
            group = align_dtype(group, dtype)
            with no_autocast(group.entries[0].tensor.device.type):
                result = self.merge_with_lambdas(group, lams, params)
            result = result.to(dtype=out_dtype) if out_dtype is not None else result
            if group.non_base:  # a slice of the base alone is passed through as it is
                _refuse_float16_overflow(result, group, params, self.delegate_name, cast=dtype != result.dtype)
                written = _written_as_float16() if out_dtype is None and result.dtype != torch.float16 else None
                if written:
                    _refuse_float16_overflow(result.to(torch.float16), group, params, self.delegate_name,
                                             cast=written)
            results.append(result)
            del group, result
        return tuple(results)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """One group on its own (mergekit's GroupMergeMethod API): λ from its tensors, or,
        for a tensor of a planned merge, the merge's (see `_lambdas_for`)."""
        token = _IN_MEMORY.set(True)
        try:
            (lambdas,) = self._lambdas_for([group], [parameters])
        finally:
            _IN_MEMORY.reset(token)
        return self.merge_with_lambdas(group, lambdas, parameters)

    # -- where the λ come from ------------------------------------------------
    def _lambdas_for(self, groups, parameters, input_dtypes=None) -> List[Dict[Hashable, float]]:
        """A planned merge task's own tensor takes the pre-pass's λ, whichever entry point
        mergekit calls (``_execute_resolved``, ``__call__``, ``merge_group``); an in-memory
        call takes those of the tensors it is handed; anything else inside a MetaGPT
        ``run_merge`` is refused rather than merged with the λ of one tensor."""
        from mergekit_metagpt.integration import CURRENT_TASK, RUN_CONTEXT

        task = CURRENT_TASK.get()
        in_memory, in_run = _IN_MEMORY.get(), RUN_CONTEXT.get() is not None
        names = [g.metadata.name for g in groups]
        shown = ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if task is not None:
            if names == [task.output_weight.name]:
                return [self._graph_lambdas(groups[0], parameters[0])]
            if not in_memory or in_run:
                raise MetaGPTError(
                    f"MetaGPT: mergekit handed tensor(s) {shown} to the merge task of "
                    f"{task.output_weight.name!r} (a mergekit version the plugin does not know: it "
                    f"knows one tensor per task, its own); their λ need their own tasks' plans"
                )
        if in_memory:
            if in_run:  # λ of one tensor's norms would pass for MetaGPT's
                raise MetaGPTError(
                    f"MetaGPT: tensor(s) {shown} of this merge reached the method outside the merge "
                    f"tasks the plugin wraps (a mergekit version the plugin does not know); "
                    f"their λ need the norms of every tensor of the merge"
                )
            with torch.no_grad():  # λ are numbers, not part of a graph (nor the scratch buffers)
                return self._in_memory_lambdas(groups, parameters, input_dtypes)
        return [self._graph_lambdas(g, p) for g, p in zip(groups, parameters)]

    def _in_memory_lambdas(self, groups, parameters, input_dtypes=None) -> List[Dict[Hashable, float]]:
        """In-memory calls hand over every tensor group at once: norms over those, cast to
        each group's input dtype as the merge casts them (``merge_state_dicts(dtype=…)``).

        Each group follows its own ``granularity`` (a per-group value, as graph merges
        follow it per tensor): ``global`` groups share the λ of the norms over all the
        groups, ``per_tensor`` groups get the λ of their own tensor's norms."""
        if groups and not any(g.non_base for g in groups):
            base = next((g.base.id for g in groups if g.base is not None), None)
            raise MetaGPTError(f"MetaGPT needs at least one model besides the base model {base}")
        alpha = uniform_alpha([p.get("alpha", 1.0) for p in parameters], "in-memory merge")
        if self.delegate_name:
            uniform_lambda_from([p.get("lambda_from", "dense") for p in parameters], "in-memory merge")
        per_tensor = [p.get("granularity", "global") == "per_tensor" for p in parameters]
        dtypes = list(input_dtypes) if input_dtypes is not None else [None] * len(groups)
        shared = None
        if not all(per_tensor):
            _refuse_bases_apart(groups)  # global λ compare every group's task vectors
            norms = in_memory_norms(groups, lambda i: self.sparsifier(parameters[i]), dtypes.__getitem__)
            coefficients = self._coefficients({m: norms.get(m, {}) for m in _models_of(groups)}, alpha)
            if len(groups) > 1:
                coefficients.log("in-memory merge", tiny_exact=True)
                self._say_if_one_model(coefficients)
            else:  # merge_tensors, perhaps in a loop over a model's tensors: λ of this tensor alone,
                # whose model equal to the base there, or lone model, is no news worth a warning
                if LOG.isEnabledFor(logging.DEBUG):
                    LOG.debug("MetaGPT coefficients of tensor %r (an in-memory merge of one tensor: λ from its "
                              "norms alone):\n%s", groups[0].metadata.name or "group 0", coefficients.table())
            shared = coefficients.lambdas
        return [
            self._coefficients(
                in_memory_norms([g], lambda _i, p=p: self.sparsifier(p), lambda _i, d=d: d), alpha
            ).lambdas
            if own else shared
            for g, p, own, d in zip(groups, parameters, per_tensor, dtypes)
        ]

    def _say_if_one_model(self, coefficients: Coefficients) -> None:
        """As a merge of checkpoints says it (`prepass`): one model is stock task arithmetic."""
        if len(coefficients.squared_norms) == 1 and coefficients.squared_norms[0][1] > 0:
            LOG.warning("MetaGPT: only one model besides the base (%s): its λ is 1, so this merge is stock %s "
                        "with weight 1; MetaGPT weighs two or more models (pass the others beside it)",
                        coefficients.squared_norms[0][0], VARIANTS.get(self.spec.name) or "task_arithmetic")

    @staticmethod
    def _coefficients(norms, alpha: float) -> Coefficients:
        return Coefficients.from_norms({m: total(v) for m, v in norms.items()}, alpha)

    def _graph_lambdas(self, group: TensorGroup, params: Dict[str, Any]) -> Dict[Hashable, float]:
        from mergekit_metagpt import prepass
        from mergekit_metagpt.integration import CURRENT_TASK, missing_for_graph_merges
        from mergekit_metagpt.merge_plan import run_for_task

        task = CURRENT_TASK.get()
        run = run_for_task(task)
        if run is None:
            missing = missing_for_graph_merges()
            why = (
                f"the plugin could not attach to {'; '.join(missing)}" if missing
                else "this merge was not planned by a mergekit entry point the plugin knows"
            )
            raise MetaGPTError(
                f"MetaGPT: cannot find the merge plan of tensor {group.metadata.name!r} ({why}); "
                f"its λ need the norms of every tensor of the merge"
            )
        if group.base is None:
            raise MetaGPTError(f"MetaGPT: the base model has no tensor {group.metadata.name!r}")
        inputs = {entry.id: entry.tensor for entry in group.entries}
        norms = prepass.run_norms(run, group.base.tensor.device, self, task=task, tensors=inputs).of(run.set_of(task))
        if params.get("granularity") == "per_tensor":
            return norms.task_lambdas(run.index_in_set(task))
        return norms.coefficients.lambdas

    # -- the merge of one tensor ---------------------------------------------
    def merge_with_lambdas(
        self, group: TensorGroup, lambdas: Dict[Hashable, float], parameters: Dict[str, Any]
    ) -> torch.Tensor:
        """θ₀ + lambda · Σ_t λ_t (θ_t − θ₀) for one tensor (inputs are never modified)."""
        base = group.base.tensor
        if not group.non_base:  # a slice of the base alone: passed through
            return base
        scale = float(parameters["lambda"])
        if self.delegate_name:
            return self._merge_with_delegate(group, lambdas, scale, parameters)
        compute = work_dtype(base)  # float32, float64 for float64 (as the norms)
        weights = [(e.tensor.reshape(-1), lambdas[e.id] * scale) for e in group.non_base]
        weights = [(x, w) for x, w in weights if w != 0.0]
        if torch.is_grad_enabled() and any(e.tensor.requires_grad for e in group.entries):
            # in memory, a caller differentiating through the merge (nn.Module parameters
            # outside no_grad): out-of-place, so that no graph reaches the reused buffers
            base_w = base.to(compute)
            merged = base_w + sum(w * (x.reshape(base.shape).to(compute) - base_w) for x, w in weights)
            return merged.to(base.dtype)
        scratch = thread_scratch()
        # a fresh contiguous output, whatever the inputs' strides (reshape copies only
        # a non-contiguous input, and only its flat view is read)
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        flat_base, flat_out = base.reshape(-1), out.view(-1)
        # θ₀ + Σ w_t (θ_t − θ₀) in float32, one chunk at a time into the output tensor
        with torch.no_grad():
            self._merge_chunks(flat_base, flat_out, weights, scratch, compute)
        return out

    @staticmethod
    def _merge_chunks(flat_base, flat_out, weights, scratch, compute) -> None:
        device = flat_base.device
        for start, end in chunks(flat_base.numel(), device):
            n = end - start
            base_c = scratch.flat("merge_base", n, device, compute).copy_(flat_base[start:end])
            merged = scratch.flat("merge_sum", n, device, compute).zero_()
            delta = scratch.flat("merge_delta", n, device, compute)
            for x, weight in weights:
                merged.add_(delta.copy_(x[start:end]).sub_(base_c), alpha=weight)
            flat_out[start:end].copy_(merged.add_(base_c))

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


def _refuse_bases_apart(groups) -> None:
    """The groups of one in-memory call must share their base: λ compare task vectors from
    one base (a direct ``method(groups)`` call may hand over any groups)."""
    first = None
    for index, group in enumerate(groups):
        if group.base is None:
            continue
        if first is None:
            first = (group.base.id, group.metadata.name or f"group {index}")
        elif group.base.id != first[0]:
            raise MetaGPTError(
                f"MetaGPT: the tensor groups of one in-memory merge have different base models "
                f"({first[0]!r} for {first[1]!r}, {group.base.id!r} for {group.metadata.name or f'group {index}'!r}); "
                f"MetaGPT's λ weigh task vectors from one base: merge each base's groups in a call of its own")


def _models_of(groups) -> List[Hashable]:
    """The non-base input ids of in-memory groups, in first-seen order."""
    models: List[Hashable] = []
    for group in groups:
        for entry in group.non_base:
            if entry.id not in models:
                models.append(entry.id)
    return models


def _written_as_float16() -> Optional[str]:
    """Why mergekit will write the current task's tensor as float16, if it will: in a graph
    merge it hands the method no out_dtype, and casts to the weight's forced dtype or the
    recipe's out_dtype only when it saves the tensor."""
    from mergekit.common import dtype_from_name

    from mergekit_metagpt.integration import CURRENT_TASK
    from mergekit_metagpt.merge_plan import run_for_task

    task = CURRENT_TASK.get()
    run = run_for_task(task)  # in mergekit's worker threads too (--multi-gpu)
    if run is None:
        return None
    forced = getattr(task.output_weight, "force_dtype", None)
    name = forced or getattr(run.config, "out_dtype", None)
    try:
        if name is None or dtype_from_name(name) != torch.float16:
            return None
    except RuntimeError:
        return None
    # (a weight's force_dtype: its architecture's)
    return f"{'force_dtype' if forced else 'out_dtype'} float16 of wider merged values"


def _refuse_float16_overflow(result: torch.Tensor, group: TensorGroup, params: Dict[str, Any],
                             delegate: Optional[str], cast) -> None:
    """A float16 output beyond ±65504 is refused, not written as Inf (as stock mergekit
    writes it): the inputs are finite (the pre-pass checked them), so the merge overflowed,
    through a `lambda` above 1, mergekit's ties / dare arithmetic in float16 (DARE's
    rescale, about 1/density), or a cast of wider results to float16 (`cast`: True for the
    call's out_dtype, or the cast's reason as text)."""
    if result.dtype != torch.float16 or bool(torch.isfinite(result).all()):
        return
    count = int((~torch.isfinite(result)).sum())
    scale = float(params.get("lambda", 1.0))
    causes = ([f"lambda {scale:g}"] if scale > 1.0 else []) + (
        [cast if isinstance(cast, str) else "out_dtype float16 of wider merged values"] if cast else
        [f"mergekit's {delegate} arithmetic in float16"] if delegate else [])
    raise MetaGPTError(
        f"MetaGPT: the merge of tensor {group.metadata.name!r} overflows float16: {count} values beyond "
        f"±65504" + (f" ({', '.join(causes)})" if causes else "") + "; merge and write in float32 or "
        "bfloat16 (recipe `dtype` / `out_dtype`; from Python, dtype= / out_dtype=)"
        + (", or with a smaller lambda" if scale > 1.0 else "")
    )
