"""Read a mergekit YAML recipe (one-line errors for bad ones) and check it is a metagpt recipe with a base."""

from __future__ import annotations

from typing import Optional

import yaml

from mergekit_metagpt.errors import MetaGPTError


def read_recipe_text(path: str) -> str:
    """The recipe's text, read once, as mergekit-yaml reads it (UTF-8): a command that needs
    it again (bake) takes this text, never the file a second time (a pipe, <(...) or
    /dev/stdin can be read only once, and a file may change during the pre-pass)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as error:
        raise MetaGPTError(f"cannot read recipe {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise MetaGPTError(
            f"recipe {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
            f"mergekit-yaml reads recipes as UTF-8; save it as UTF-8") from None


def load_recipe(path: str, text: Optional[str] = None):
    """Parse a mergekit YAML recipe into a MergeConfiguration (`text`: the recipe's text,
    already read by read_recipe_text)."""
    from mergekit.config import MergeConfiguration

    if text is None:
        text = read_recipe_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        if getattr(error, "problem", None) == "but found another document":
            raise MetaGPTError(
                f"recipe {path} holds several YAML documents (a mergekit-multi file); the CLI takes "
                f"one recipe: put the one you want in a file of its own (an intermediate merge's "
                f"output must exist for a later recipe to read it)"
            ) from None
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None)
        if problem is None and isinstance(error, yaml.reader.ReaderError):  # a NUL, a control character
            line = text.count("\n", 0, error.position) + 1
            where = f" (line {line})"
            problem = str(error).splitlines()[0]
        problem = problem or "syntax error"
        raise MetaGPTError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise MetaGPTError(f"recipe {path} is not a YAML mapping")
    from mergekit_metagpt.recipe_keys import check_duplicate_keys, check_recipe_keys

    check_duplicate_keys(text, path)
    check_recipe_keys(data, path)
    try:
        return MergeConfiguration.model_validate(data)
    except Exception as error:  # pydantic's message, on one line
        first = str(error).splitlines()
        raise MetaGPTError(f"recipe {path} is not a valid mergekit recipe: {' '.join(first[:3])}") from None


def check_metagpt(config, path: str = "recipe") -> None:
    from mergekit_metagpt.method import VARIANTS, meant_variant

    if config.merge_method not in VARIANTS:
        meant = meant_variant(config.merge_method)
        raise MetaGPTError(f"{path}: merge_method is {config.merge_method!r}, not a metagpt method"
                           + (f"; did you mean {meant!r}?" if meant else ""))
    check_base(config, f"{path}: ")


#: Why a MetaGPT recipe needs a base, for the message
NEEDS_A_BASE = ("a MetaGPT recipe needs a base_model: the pre-trained model the fine-tunes share, whose task "
                "vectors θ_t − θ₀ it weighs (add `base_model: PATH` to the recipe)")


def check_base(config, where: str = "MetaGPT: ") -> None:
    """Refuse a recipe without a base (no top-level base_model, and a slice without its own)."""
    if config.base_model is None and not _every_slice_has_a_base(config):
        raise MetaGPTError(where + NEEDS_A_BASE)


def _every_slice_has_a_base(config) -> bool:
    """Without a top-level base_model: the recipe merges only slices (its own or its
    modules'), each with a base_model of its own."""
    owners = [config, *(getattr(config, "modules", None) or {}).values()]  # none in mergekit-pytorch's
    slices = [piece for owner in owners for piece in getattr(owner, "slices", None) or []]
    return (bool(slices) and not any(owner.models for owner in owners)
            and all(piece.base_model is not None for piece in slices))
