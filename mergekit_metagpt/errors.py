"""The plugin's error type (bad input, named), and how the CLI prints any error on one line."""


class MetaGPTError(ValueError):
    """Bad input for a MetaGPT merge: the message names the model and tensor."""


def one_line(error: BaseException) -> str:
    """The error as one line for the CLI: ours as written, pydantic's validation errors
    as 'where: message (got value)', others prefixed with their type."""
    if isinstance(error, MetaGPTError):
        return " ".join(str(error).split())
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - mergekit depends on pydantic
        ValidationError = ()
    if isinstance(error, ValidationError):
        # e.g. a parameter mergekit resolves while planning: "lambda must be ... (got -1)"
        parts = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()))
            shown = repr(item["input"]) if "input" in item else ""
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            got = f" (got {shown})" if shown else ""
            parts.append(f"{where + ': ' if where else ''}{item.get('msg', '')}{got}")
        return " ".join("; ".join(parts).split()) or type(error).__name__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
