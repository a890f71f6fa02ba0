"""Save and restore torch's float32 matmul precision settings (both of its APIs) in tests."""

import contextlib

import torch

#: torch.backends objects with an ``fp32_precision`` (torch >= 2.9), parents first
_BACKENDS = ("", "mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn", "cuda.matmul", "cudnn", "cudnn.conv",
             "cudnn.rnn")
NEW_API = hasattr(torch.backends, "fp32_precision")


def backend(path: str):
    target = torch.backends
    for part in filter(None, path.split(".")):
        target = getattr(target, part)
    return target


def legacy_precision():
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


@contextlib.contextmanager
def precision_restored():
    """Run the block, then put both precision APIs back as they were; checks that the
    legacy getter answers as before (it raises while the two APIs disagree)."""
    legacy = legacy_precision()
    saved = {path: backend(path).fp32_precision for path in _BACKENDS if NEW_API}
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)  # its own state, which the new API leaves
        for path, value in saved.items():  # parents first: a parent's setting reaches its children
            backend(path).fp32_precision = value
        assert legacy_precision() == legacy, "the float32 matmul precision settings were not restored"
