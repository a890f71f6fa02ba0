"""The plugin's error type (bad input, named), and how the CLI prints any error on one line."""

from typing import Optional


class MetaGPTError(ValueError):
    """Bad input for a MetaGPT merge: the message names the model and tensor."""


def base_lacks(base, name: Optional[str], holders) -> MetaGPTError:
    """A tensor the base model lacks, which `holders` have: no task vector without it."""
    tensor = repr(name) if name is not None else "(unnamed)"
    return MetaGPTError(f"MetaGPT: the base model {base} has no tensor {tensor}, which model(s) "
                        f"{', '.join(str(m) for m in holders)} have")


def out_of_memory(error: BaseException) -> bool:
    """Out of host or GPU memory: not bad input, so never re-raised as a MetaGPTError."""
    if isinstance(error, MemoryError):
        return True
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError)


def reported_as_bug(error: BaseException) -> bool:
    """An error no input explains (a TypeError, AttributeError, ... of this plugin's or
    mergekit's code), as opposed to bad recipes, files, models and settings, which mergekit
    and the plugin raise as ValueError (pydantic's ValidationError, MetaGPTError), OSError,
    KeyError, RuntimeError or a YAML error."""
    expected = (ValueError, OSError, KeyError, RuntimeError, MemoryError)
    try:
        import yaml

        expected += (yaml.YAMLError,)
    except ImportError:  # pragma: no cover - mergekit depends on PyYAML
        pass
    return not isinstance(error, expected)


#: Bidirectional-text controls: they reorder what a terminal or page shows of the text after
#: them (a name that reads as another).
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """`text` with control characters (ESC of a terminal's escape sequences, BEL, NUL, C1's
    CSI …) and bidirectional controls written as escapes (``\\x1b``, ``\\u202e``): a recipe's
    strings (a parameter's name, a model's path) printed as they were could retitle or clear
    the terminal, or set its clipboard. ``\\n`` and tabs are left as they are (a caller wanting one
    line joins its lines)."""
    import unicodedata

    if text.isprintable():
        return text
    return "".join(
        ch if ch in "\n\t" or (ch not in _BIDI and unicodedata.category(ch) != "Cc")
        else ascii(ch)[1:-1]
        for ch in text
    )


class PrintableRecords:
    """A logging filter: the plugin's log records, formatted, with control characters as
    escapes (`printable`): its messages name models and tensors as a recipe spells them."""

    def filter(self, record) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # as logging would: its handler reports a bad format
            return True
        if not message.isprintable():  # (a table's line breaks too: kept)
            shown = printable(message)
            if shown != message:
                record.msg, record.args = shown, None
        return True


def one_line(error: BaseException) -> str:
    """The error as one line for the CLI: ours as written, pydantic's validation errors
    as 'where: message (got value)', others prefixed with their type."""
    return printable(_one_line(error))


def _one_line(error: BaseException) -> str:
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
