"""Keys of a recipe that mergekit does not read.

mergekit's recipe classes (pydantic) drop keys they do not know without a word, so a
misspelt key changes the merge silently: ``paramters: {lambda: 0.5}`` merges at lambda
1, and a ``fliter:`` in a conditional parameter applies its value to every tensor. The
raw YAML is walked along mergekit's own classes (their fields, as pydantic declares
them); a key that is not one of the fields at its place is refused where it is a close
misspelling of one (it can only be a mistake), and warned of otherwise (notes such as
``name:`` or ``description:`` on shared recipes are common and harmless).
"""

from __future__ import annotations

import difflib
import logging
import types
import typing
from typing import Any, List, Optional, Tuple

from mergekit_metagpt.errors import MetaGPTError

LOG = logging.getLogger("mergekit_metagpt")

#: How close a key must be to a field to count as its misspelling (difflib's ratio:
#: `paramters` and `parameters` 0.95, `fliter`/`filter` 0.83, `base`/`base_model` 0.57).
CLOSE = 0.8


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and hasattr(annotation, "model_fields")


def _fields(model) -> dict:
    """The keys pydantic reads for `model` (aliases where declared), to their annotations."""
    known = {}
    for name, info in model.model_fields.items():
        known[name] = info.annotation
        if getattr(info, "alias", None):
            known[info.alias] = info.annotation
    return known


def _options(annotation) -> List[Any]:
    """The members of a Union (Optional included), else the annotation alone; Annotated
    is unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _options(typing.get_args(annotation)[0])
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return [member for arg in typing.get_args(annotation) for member in _options(arg)]
    return [annotation]


def _unknown(value: Any, annotation, where: str, out: List[Tuple[str, str, List[str]]]) -> None:
    """Append (place, key, keys known there) for each key of `value` its annotation lacks
    (each level one annotation deeper: a YAML alias cycle ends with the annotations)."""
    options = _options(annotation)
    if isinstance(value, dict):
        models = [option for option in options if _is_model(option)]
        if models:
            # of several classes (a union), the one that knows most of the keys
            model = max(models, key=lambda m: sum(key in _fields(m) for key in value))
            known = _fields(model)
            for key, item in value.items():
                place = f"{where}.{key}" if where else str(key)
                if key not in known:
                    out.append((where, str(key), sorted(known)))
                else:
                    _unknown(item, known[key], place, out)
            return
        for option in options:
            if typing.get_origin(option) is dict:
                _, item_type = typing.get_args(option)
                for key, item in value.items():
                    _unknown(item, item_type, f"{where}.{key}" if where else str(key), out)
                return
    elif isinstance(value, list):
        lists = [option for option in options if typing.get_origin(option) is list]
        if any(isinstance(item, dict) for item in value):  # a list of classes, if any
            lists.sort(key=lambda option: not any(_is_model(m) for m in _options(typing.get_args(option)[0])))
        if lists:
            (item_type,) = typing.get_args(lists[0])
            for index, item in enumerate(value):
                _unknown(item, item_type, f"{where}[{index}]", out)


def unknown_keys(data: dict) -> List[Tuple[str, str, List[str]]]:
    """(place, key, the keys mergekit reads there) for each key of a recipe's YAML mapping
    that mergekit's MergeConfiguration does not read; place is '' at the top level."""
    from mergekit.config import MergeConfiguration

    out: List[Tuple[str, str, List[str]]] = []
    _unknown(data, MergeConfiguration, "", out)
    return out


def check_recipe_keys(data: Any, source: Optional[str] = None) -> None:
    """Refuse a recipe key that misspells one mergekit reads at its place; warn of other
    keys mergekit ignores. `data` is the recipe's YAML, parsed; `source` names it."""
    if not isinstance(data, dict):
        return
    try:
        problems = unknown_keys(data)
    except Exception as error:  # pragma: no cover - mergekit's classes changed shape
        LOG.warning("MetaGPT: the recipe's keys were not checked for misspellings (%s: %s)",
                    type(error).__name__, error)
        return
    of = f" of {source}" if source else ""
    for where, key, known in problems:
        place = f"under {where}" if where else "at the top level"
        close = difflib.get_close_matches(key, known, n=1, cutoff=CLOSE)
        if close:
            raise MetaGPTError(
                f"the recipe key {key!r}{of} ({place}) is not one mergekit reads: it would be "
                f"ignored silently; did you mean {close[0]!r}?"
            )
    for where, key, known in problems:
        place = f"under {where}" if where else "at the top level"
        LOG.warning("MetaGPT: mergekit ignores the recipe key %r%s (%s; it reads there: %s)",
                    key, of, place, ", ".join(known))


def duplicate_keys(text: str) -> List[Tuple[str, str, int, int]]:
    """(place, key, first line, repeated line) for each key given twice in one mapping of a
    recipe's YAML text (YAML loaders keep the last silently); place is '' at the top level."""
    import yaml

    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:  # the loader reports it in its words
        return []
    out: List[Tuple[str, str, int, int]] = []
    seen = set()  # an alias is the node it names: walked once (a cycle, `&a [*a]`, or aliases of aliases)

    def walk(node, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key, value in node.value:
                merge = key.tag == "tag:yaml.org,2002:merge"  # `<<: *defaults`, as often as wanted
                name = key.value if isinstance(key, yaml.ScalarNode) and not merge else None
                if name is not None and name in first:
                    out.append((where, name, first[name], key.start_mark.line + 1))
                elif name is not None:
                    first[name] = key.start_mark.line + 1
                walk(value, f"{where}.{name}" if where else str(name))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{where}[{index}]")

    for document in documents:
        walk(document, "")
    return out


def check_duplicate_keys(text: str, source: Optional[str] = None) -> None:
    """Refuse a recipe that gives one key twice in a mapping: YAML keeps the last, so the
    first (a `models:` list, a parameter) would be left out without a word."""
    repeated = duplicate_keys(text)
    if repeated:
        where, key, first, again = repeated[0]
        place = f"under {where}" if where else "at the top level"
        of = f" of {source}" if source else ""
        raise MetaGPTError(
            f"the recipe key {key!r}{of} ({place}) is given twice, on lines {first} and {again}: YAML keeps "
            f"the last silently, so the first would be left out; merge them into one"
        )
