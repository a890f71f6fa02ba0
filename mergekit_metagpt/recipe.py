"""Read a metagpt recipe's base and models, with one-line errors for bad recipes."""

from __future__ import annotations

from typing import List, Tuple

import yaml

from mergekit_metagpt.errors import MetaGPTError


def load_recipe(path: str):
    """Parse a mergekit YAML recipe into a MergeConfiguration."""
    from mergekit.config import MergeConfiguration

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as error:
        raise MetaGPTError(f"cannot read recipe {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise MetaGPTError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise MetaGPTError(f"recipe {path} is not a YAML mapping")
    try:
        return MergeConfiguration.model_validate(data)
    except Exception as error:  # pydantic's message, on one line
        first = str(error).splitlines()
        raise MetaGPTError(f"recipe {path} is not a valid mergekit recipe: {' '.join(first[:3])}") from None


def base_and_models(config, path: str = "recipe") -> Tuple[object, List[object]]:
    if not str(config.merge_method).startswith("metagpt"):
        raise MetaGPTError(f"{path}: merge_method is {config.merge_method!r}, not a metagpt method")
    if config.base_model is None:
        raise MetaGPTError(f"{path}: MetaGPT needs a base_model")
    if not config.models:
        raise MetaGPTError(f"{path}: only recipes with a top-level `models:` list are supported here")
    models = [m.model for m in config.models if m.model != config.base_model]
    if not models:
        raise MetaGPTError(f"{path}: MetaGPT needs at least one model besides the base model")
    return config.base_model, models
