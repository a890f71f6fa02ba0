"""Checks of a MetaGPT recipe that mergekit does not make, run before anything is read.

mergekit 0.1.5 resolves only the parameters a method declares, so a misspelt name, or
a shared parameter such as ``lambda`` given per model, would be ignored silently; and it
checks a value only when it resolves it for a tensor, in a message that names neither
the model nor where the value is given. One function, ``check_config``, is called by the
``run_merge`` wrapper (``mergekit-yaml``, ``run_merge``, ``mergekit-multi``) and by
``mergekit-metagpt coefficients|bake|inspect``. ``check_module_names`` (a ``modules:``
recipe's names against the architecture's; mergekit's own message is a bare ``KeyError``)
is called by both once the architecture is known.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Iterator, Optional, Set, Tuple

from mergekit_metagpt.errors import MetaGPTError

LOG = logging.getLogger("mergekit_metagpt")

# Pydantic classes of mergekit's config whose `parameters` belong to one input model.
PER_INPUT = ("InputModelDefinition", "InputSliceDefinition")

WEIGHT_HELP = (
    "MetaGPT computes each model's weight (λ) from the task-vector norms; to set "
    "weights by hand, remove `weight` and run `mergekit-metagpt bake RECIPE.yml OUT.yml`: "
    "it writes the equivalent stock recipe with the λ as weights you can edit"
)


NORMALIZE_HELP = (
    "MetaGPT's λ sum to 1 (times lambda) and are applied as computed, as with mergekit's "
    "normalize: false; normalize: true would divide each element by the sum of the λ of the models "
    "that contribute to it (after TIES or DARE trimming, or where a model lacks a tensor), which is "
    "not MetaGPT's merge"
)


def normalize_is_off(value: Any) -> bool:
    """Whether a `normalize` value asks for what MetaGPT does anyway: one that mergekit
    reads as false (false, 0, "false", "no", …; pydantic's bool), or per-group values
    (mergekit's in-memory PerGroupValues) that all are. Accepted."""
    from pydantic import TypeAdapter, ValidationError

    per_group = getattr(value, "values", None)
    if isinstance(per_group, tuple):
        return bool(per_group) and all(normalize_is_off(v) for v in per_group)
    try:
        return TypeAdapter(bool).validate_python(value) is False
    except ValidationError:
        return False


EPSILON_HELP = (
    "epsilon sets DELLA's magnitude-ranked drop probabilities (and RAM's threshold); MetaGPT has no "
    "such setting (metagpt_dare and metagpt_dare_ties drop at random at `density`, as DARE; "
    "metagpt_ties keeps the largest, as TIES): remove epsilon"
)


INT8_MASK_HELP = (
    "int8_mask sets the dtype of TIES's sign election, which metagpt_ties and metagpt_dare_ties do "
    "(metagpt_dare is mergekit's dare_linear, DARE without sign election; metagpt merges dense task "
    "vectors): use metagpt_dare_ties for a recipe copied from dare_ties, or drop int8_mask"
)


RESCALE_HELP = (
    "rescale sets whether DARE rescales the entries it keeps, which metagpt_dare and "
    "metagpt_dare_ties do (metagpt_ties is TIES, which does not rescale; metagpt merges dense task "
    "vectors): use metagpt_dare_ties for a recipe copied from dare_ties, metagpt_dare for one from "
    "dare_linear, or drop rescale"
)


DENSITY_HELP = (
    "metagpt merges the dense task vectors; for TIES or DARE sparsification with MetaGPT's λ, "
    "use merge_method: metagpt_ties, metagpt_dare or metagpt_dare_ties"
)


def _settings(node: Any, seen: Set[int], context: Tuple[str, ...] = ()) -> Iterator[Tuple[str, Any, Optional[str], Tuple[str, ...]]]:
    """(name, setting, the input model it is given for or None, where it is given: e.g.
    ("layers 0-4", "slice 2")) for every parameter setting in a config tree."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _settings(value, seen, context + ((f"module {key}",) if isinstance(key, str) else ()))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            inner = (f"slice {index + 1}",) if type(value).__name__ == "OutputSliceDefinition" else ()
            yield from _settings(value, seen, inner + context)
    elif hasattr(type(node), "model_fields"):
        model, here = None, context
        if type(node).__name__ in PER_INPUT:
            model = str(node.model)
            layers = getattr(node, "layer_range", None)
            here = ((f"layers {layers[0]}-{layers[1]}",) if layers else ()) + context
        for name in type(node).model_fields:
            value = getattr(node, name, None)
            if name == "parameters" and isinstance(value, dict):
                for key, setting in value.items():
                    yield key, setting, model, here
            elif value is not None:
                yield from _settings(value, seen, context)


def _scalars(setting: Any, condition: Tuple[str, ...] = ()) -> Iterator[Tuple[Any, Tuple[str, ...]]]:
    """(value, ("filter …",) or ()) for every value of a setting mergekit may read: scalars,
    gradient endpoints, the values of `filter:` conditions up to the first without a filter
    (mergekit validates each value it resolves for a tensor, interpolated gradients too)."""
    if hasattr(setting, "value") and hasattr(setting, "filter"):  # ConditionalParameter
        text = (f"filter {setting.filter}",) if setting.filter not in (None, "*") else ()
        yield from _scalars(setting.value, text)
    elif isinstance(setting, (list, tuple)):
        for item in setting:
            yield from _scalars(item, condition)
            if _catch_all(item):  # mergekit takes the first condition that matches: none after it
                break
    else:
        yield setting, condition


def _catch_all(item: Any) -> bool:
    return hasattr(item, "value") and hasattr(item, "filter") and item.filter in (None, "*")


def _value_problem(spec, value: Any) -> Optional[str]:
    """Why `value` is not one of the parameter's values ("must be …"), or None if it is."""
    from pydantic import ValidationError

    try:
        spec.validate(value)
    except ValidationError as error:
        details = error.errors()
        reason = str(details[0].get("msg", error)) if details else str(error)
        reason = reason.replace(f"MetaGPT: parameter {spec.name} ", "")
        return "s" + reason[len("Input s"):] if reason.startswith("Input should") else reason
    return None


#: `weight` given to an in-memory call (merge_state_dicts, merge_tensors): no recipe to bake
WEIGHT_HELP_IN_MEMORY = (
    "MetaGPT computes each model's weight (λ) from the task-vector norms (logged at INFO); to set "
    "weights by hand, merge with task_arithmetic and those λ as weights"
)


def _given_for(models) -> str:
    """` (given for model X)` (the models a parameter is given for in the recipe), or ''."""
    models = list(dict.fromkeys(str(m) for m in models))
    return f" (given for model{'s' if len(models) > 1 else ''} {', '.join(models)})" if models else ""


def _unknown_name(name: str, known, models) -> str:
    """An unknown parameter as the refusal lists it: with the known name it may be a
    misspelling of, and the models it is given for (none: at the top or a slice's level)."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    meant = f" (did you mean {close[0]}?)" if close else ""
    if not close:  # a misspelling of another variant's parameter (densty under metagpt)
        variants = _variants_taking()
        close = difflib.get_close_matches(name, sorted(set(variants) - {name}), n=1, cutoff=0.75)
        meant = f" (did you mean {close[0]}? a parameter of {', '.join(variants[close[0]])})" if close else ""
    given = _given_for([m for m in models if m is not None])
    if given and None in models:  # also at the top or a slice's level
        given = given[:-1] + ", and for all models)"
    return name + meant + given


def _variants_taking():
    """Parameter name -> the MetaGPT variants that take it."""
    from mergekit_metagpt.method import VARIANTS, MetaGPTMerge

    out = {}
    for variant in VARIANTS:
        for parameter in MetaGPTMerge(variant).spec.parameters:
            out.setdefault(parameter.name, []).append(variant)
    return out


def unknown_parameters_message(method_name: str, unknown, known, in_memory: bool = False,
                               models=None) -> str:
    """The refusal of parameters a MetaGPT variant does not take, with why for those
    copied from other methods' recipes (shared by recipes and in-memory calls; `normalize`
    is checked before, by value); `models`: name -> the models the recipe gives it for."""
    message = (
        f"Unknown parameter(s) for {method_name}: "
        f"{', '.join(_unknown_name(n, known, (models or {}).get(n, ())) for n in sorted(unknown))} "
        f"(it takes: {', '.join(sorted(known))})"
    )
    weight_help = WEIGHT_HELP_IN_MEMORY if in_memory else WEIGHT_HELP
    helps = {"weight": weight_help, "int8_mask": INT8_MASK_HELP, "rescale": RESCALE_HELP,
             "density": DENSITY_HELP, "epsilon": EPSILON_HELP}
    for name in sorted(unknown, key=lambda n: (n not in helps, n)):
        if name in helps:
            message += f". {helps[name]}"
        elif others := _methods_taking(name):
            message += f". {name} is a parameter of mergekit's {', '.join(others)}, not of MetaGPT: remove it"
    return message


def _methods_taking(name: str):
    """The registered merge methods other than MetaGPT's that declare a parameter `name`."""
    try:
        from mergekit.merge_methods import registry

        specs = [getattr(m, "spec", None) for m in registry.registered_methods()]
        return sorted(spec.name for spec in specs
                      if spec is not None and not spec.name.startswith("metagpt")
                      and name in {p.name for p in spec.parameters})
    except Exception:  # mergekit changed shape: the message goes without it
        return []


def check_config(config) -> None:
    """Refuse unknown parameter names, shared parameters given per model, and values the
    parameter does not take (naming the parameter, the model and the slice), before
    mergekit resolves them tensor by tensor (its message names neither)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    from mergekit_metagpt.recipe import check_base

    check_base(config)
    _check_dtypes(config)
    _check_slices_have_sources(config)
    method_name = getattr(config, "merge_method", None)
    spec = registry.get(method_name).spec
    specs = {p.name: p for p in spec.parameters}
    shared = {p.name for p in spec.parameters if p.scope == ParameterScope.SHARED}
    per_input = {p.name for p in spec.parameters if p.scope != ParameterScope.SHARED}
    unknown, misplaced, models_of = set(), set(), {}  # models_of: name -> the models it is given for
    settings = list(_settings(config, set()))
    # normalize: false asks for what MetaGPT does: accepted (mergekit reads no undeclared
    # parameter); any other value is refused, with why
    normalize = [item for item in settings if item[0] == "normalize"]
    settings = [item for item in settings if item[0] != "normalize"]
    problems = []  # all at once: a recipe copied from another method often has several
    for _name, setting, model, where in normalize:
        values = list(_scalars(setting))
        wrong = [(v, c) for v, c in values if not normalize_is_off(v)] or ([] if values else [(setting, ())])
        if wrong:
            value, condition = wrong[0]
            problems.append(f"normalize must be false for {method_name}, or left out "
                            f"(got {shown(value)}{_place(model, where + condition)}): "
                            f"{NORMALIZE_HELP}")
            break
    for name, _setting, model, _where in settings:
        if name not in shared | per_input:
            unknown.add(name)
            models_of.setdefault(name, []).append(model)  # None: for all models
        elif model is not None and name in shared:
            misplaced.add(name)
    if unknown:
        problems.append(unknown_parameters_message(method_name, unknown, shared | per_input, models=models_of))
    if misplaced:
        models = list(dict.fromkeys(str(m) for n, _s, m, _w in settings if n in misplaced and m is not None))
        problems.append(
            f"Parameter(s) {', '.join(sorted(misplaced))} of {method_name} apply to the whole "
            f"merge (one value for every model), but are given for a single model ({', '.join(models)}); "
            f"move them to the top-level (or slice-level) `parameters:`"
        )
    # values, of the parameters the method takes; a per-model value given for the base, of
    # a parameter mergekit resolves for the other models only (density), is never read: not
    # checked
    bases = {str(b) for b in _bases(config)}
    values = []
    for name, setting, model, where in settings:
        if name not in specs or (model in bases and specs[name].scope == ParameterScope.NON_BASE):
            continue
        for value, condition in _scalars(setting):
            problem = _value_problem(specs[name], value)
            if problem is not None:
                values.append((model is not None, f"parameter {name}{_place(model, where + condition)} "
                                                  f"{problem} (got {shown(value)})"))
    values = list(dict.fromkeys(text for _, text in sorted(values, key=lambda v: v[0])))  # the merge's first
    problems += values
    if problems:
        message = ". Also: ".join(problems)
        raise MetaGPTError(f"MetaGPT: {message}" if problems[0] in values else message)


def shown(value: Any) -> str:
    """A recipe's value in an error message: its repr, cut to 60 characters (a recipe's
    ``lambda: 1000…`` of 5000 digits, which Python refuses to print, by its size)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


def _place(model, parts) -> str:
    """Where a value is given: " for model M (layers 0-2, filter mlp)", or "" at the top."""
    return (f" for model {model}" if model else "") + (f" ({', '.join(parts)})" if parts else "")


def check_recipe_writable(config, config_source, options) -> None:
    """mergekit writes the recipe into the model card and mergekit_config.yml once every
    weight is written: from its text where run_merge is given it (mergekit-yaml), else by
    serialising it (run_merge from Python), which fails on a path mergekit 0.1.5 cannot
    serialise: the whole merge done, then a traceback, whatever the method."""
    if config_source is None and getattr(options, "write_model_card", True):
        check_serialisable(config, "it writes the recipe into the model card and mergekit_config.yml after the "
                                   "merge; rename the folder, merge with mergekit-yaml (which writes the "
                                   "recipe's own text; from Python: run_merge(..., config_source=TEXT)), or "
                                   "turn the model card off (--no-write-model-card)")


def check_serialisable(config, advice: str) -> None:
    """mergekit serialises a recipe (``to_yaml``) where it has no text of it (run_merge from
    Python, for the card; mergekit-multi, every recipe before its first merge). mergekit
    0.1.5 fails there on a model path holding a space or '"' (its ModelReference gives
    itself back: "Circular reference detected"). `advice`: what to do, where it is checked."""
    from mergekit_metagpt.errors import one_line

    try:
        config.to_yaml()
    except Exception as error:
        culprit = next((str(m) for m in config.referenced_models() if not _serialises(m)), None)
        raise MetaGPTError(
            f"{'model ' + culprit if culprit else 'the recipe'}: mergekit 0.1.5 cannot serialise it "
            f"({one_line(error)}; a path holding a space or '\"'), whatever the method: {advice}") from None


def _serialises(reference) -> bool:
    try:
        reference.model_dump_json()
        return True
    except Exception:
        return False


def check_raw_paths(config) -> None:
    """mergekit-pytorch serialises each model's path (as text, a ModelReference) while it
    merges: a path holding a space or '"' failed mid-merge (after the pre-pass), whatever
    the method; so does one it cannot parse (two '+')."""
    from mergekit.common import ModelReference

    from mergekit_metagpt.errors import one_line

    for path in [p for p in [config.base_model, *(m.model for m in config.models)] if p]:
        try:
            ModelReference.model_validate(str(path)).model_dump_json()
        except Exception as error:
            raise MetaGPTError(f"model {path}: mergekit-pytorch 0.1.5 fails on this path ({one_line(error)}; "
                               "a path holding a space or '\"'), whatever the method: rename the file") from None


def _check_dtypes(config) -> None:
    """``dtype``/``out_dtype`` mergekit cannot read: its own message (``Unimplemented dtype``)
    names neither key, and for ``out_dtype`` comes only at the first tensor written, after
    the whole pre-pass."""
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key, None)
        if value and not floating_dtype(value):  # int64: weights cut to integers (zeros); "": none
            raise MetaGPTError(f"the recipe's {key} {shown(value)} is not a floating-point dtype mergekit knows "
                               f"(bfloat16, float16, float32, float64)")


def floating_dtype(name: str) -> bool:
    """Whether mergekit reads `name` as a floating-point dtype (it also knows int64, in
    which weights are cut to integers)."""
    from mergekit.common import dtype_from_name

    try:
        dtype = dtype_from_name(name)
    except RuntimeError:
        return False
    return dtype is not None and dtype.is_floating_point


def _check_slices_have_sources(config) -> None:
    """A slice with ``sources: []``: mergekit's own message is an IndexError at planning."""
    modules = getattr(config, "modules", None) or {}
    owners = [("", config)] + [(f" of module {name}", module) for name, module in modules.items()]
    for where, owner in owners:
        for index, output_slice in enumerate(getattr(owner, "slices", None) or []):
            if not getattr(output_slice, "sources", None):
                raise MetaGPTError(f"slice {index + 1}{where} has no sources: give it at least the base "
                                   f"model's layers (sources: [{{model: BASE, layer_range: [START, END]}}])")


def _bases(config) -> Iterator[Any]:
    """The recipe's base models: the top-level one and any slice's own."""
    if getattr(config, "base_model", None) is not None:
        yield config.base_model
    modules = getattr(config, "modules", None) or {}
    for owner in [config, *modules.values()]:
        for output_slice in getattr(owner, "slices", None) or []:
            if getattr(output_slice, "base_model", None) is not None:
                yield output_slice.base_model


def _required_weights(module, model_config) -> Optional[int]:
    """How many weights of a module mergekit requires (not optional), None if unknown."""
    try:
        return sum(not w.optional for w in module.architecture.all_weights(config=model_config))
    except Exception:  # another mergekit's shape: say it as if some were required
        return None


def check_module_names(config, arch_info, options=None) -> None:
    """Refuse a ``modules:`` recipe naming a module the architecture does not have; warn of
    one leaving out a module with required weights (mergekit writes none of its weights,
    with no message)."""
    known = list(getattr(arch_info, "modules", None) or {})
    listed = list(getattr(config, "modules", None) or {})
    unknown = [name for name in listed if name not in known]
    architecture = (getattr(arch_info, "architectures", None) or ["the models' architecture"])[0]
    left_out = [name for name in known if name not in listed] if listed and not unknown else []
    if left_out:
        try:  # the base's transformers config (mergekit has just read it for the architecture)
            model_config = config.base_model.config(
                trust_remote_code=bool(getattr(options, "trust_remote_code", False)))
        except Exception:
            model_config = None
        left_out = [name for name in left_out
                    if model_config is None or _required_weights(arch_info.modules[name], model_config) != 0]
    if left_out:
        LOG.warning("MetaGPT: the recipe's modules: leave out %s of %s: mergekit merges and writes none of "
                    "%s weights, so the merged model lacks them (list %s under modules: to merge %s)",
                    ", ".join(map(repr, left_out)), architecture, "its" if len(left_out) == 1 else "their",
                    "it" if len(left_out) == 1 else "them", "it" if len(left_out) == 1 else "them")
    if not unknown or not known:
        return
    guesses = [f"{close[0]!r} for {name!r}" for name in unknown
               for close in [difflib.get_close_matches(name, known, n=1)] if close]
    names = ", ".join(map(repr, unknown))
    raise MetaGPTError(
        (f"module {names} of the recipe is not a module" if len(unknown) == 1 else
         f"modules {names} of the recipe are not modules")
        + f" of {architecture} (it has: {', '.join(known)})"
        + (f"; did you mean {', '.join(guesses)}?" if guesses else "")
    )
