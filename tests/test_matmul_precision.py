"""The norms' choice between the block Gram products and elementwise products follows the
CPU's float32 matmul precision, set through either of torch's APIs, and never raises.

Since torch 2.9, ``torch.get_float32_matmul_precision()`` raises once the per-backend API
(``torch.backends.fp32_precision = "tf32"``, as transformers' ``enable_tf32`` and
``TrainingArguments(tf32=True)`` set it) has been used in the process. Every test here
restores the process's settings (both APIs) afterwards: the other tests run in the same
process.
"""

from types import SimpleNamespace

import pytest
import torch

from mergekit_metagpt import norms as norms_module
from mergekit_metagpt.norms import exact_cpu_matmul, task_vector_sums
from mergekit_metagpt.scratch import Scratch
from matmul_settings import NEW_API, backend, legacy_precision, precision_restored

@pytest.fixture(scope="module")
def family():
    """A bf16 base and three models over several CPU chunks, whose task vectors share a
    component (inner products far from zero), with float64 references."""
    gen = torch.Generator().manual_seed(3)
    n = 1_500_000  # three chunks of 2 MiB and a partial one, and a tail short of a Gram block
    base = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    shared = torch.randn(n, generator=gen)
    models = [(base.float() + s * (torch.randn(n, generator=gen) + w * shared)).to(torch.bfloat16)
              for s, w in ((0.001, 1.0), (0.01, 0.5), (0.1, 2.0))]
    deltas = [m.double() - base.double() for m in models]
    pairs = [(0, 1), (0, 2), (1, 2)]
    norms = [float(d.pow(2).sum()) for d in deltas]
    products = [float((deltas[i] * deltas[j]).sum()) for i, j in pairs]
    return SimpleNamespace(base=base, models=models, pairs=pairs, norms=norms, products=products)


def _spied(monkeypatch):
    """Which Gram path each call of task_vector_sums takes."""
    used = []
    for name in ("_block_gram", "_pairwise_gram"):
        real = getattr(norms_module, name)
        monkeypatch.setattr(norms_module, name,
                            lambda *args, _real=real, _name=name: used.append(_name) or _real(*args))
    return used


def _check(family, with_pairs: bool):
    norms, products, _ = task_vector_sums(
        family.models, family.base, Scratch(), check_base=True, pairs=family.pairs if with_pairs else ()
    )
    for value, exact in zip(norms, family.norms):
        assert abs(float(value) - exact) / exact < 1e-6, (float(value), exact)
    for value, exact in zip(products, family.products):
        assert abs(float(value) - exact) / abs(exact) < 1e-6, (float(value), exact)
    assert len(products) == (len(family.pairs) if with_pairs else 0)


def _set(path: str, value: str) -> None:
    if path == "legacy":
        torch.set_float32_matmul_precision(value)
        return
    if not NEW_API:
        pytest.skip("torch < 2.9 has no per-backend fp32_precision")
    backend(path).fp32_precision = value


@pytest.mark.parametrize("path, value, block", [
    ("", "tf32", False),  # transformers' enable_tf32(True): the legacy getter raises
    ("mkldnn.matmul", "tf32", False),
    ("mkldnn.matmul", "bf16", False),
    ("cuda.matmul", "tf32", True),  # CUDA only: the CPU's products stay exact (the legacy getter raises)
    ("", "ieee", True),  # transformers' enable_tf32(False)
    ("mkldnn.matmul", "ieee", True),
    ("legacy", "highest", True),
    ("legacy", "high", False),
    ("legacy", "medium", False),
])
def test_gram_path_follows_the_cpu_matmul_precision(path, value, block, family, monkeypatch):
    """Norms and inner products equal float64 to 1e-6 relative, with and without pairs,
    whichever API lowered (or not) the CPU's float32 matmul precision; the block Gram
    products only where the CPU's products are exact, else elementwise products."""
    with precision_restored():
        _set(path, value)
        used = _spied(monkeypatch)
        _check(family, with_pairs=False)
        assert used == [], "norms without pairs need no Gram matrix"
        _check(family, with_pairs=True)
        assert used and set(used) == {"_block_gram" if block else "_pairwise_gram"}, used
        assert exact_cpu_matmul() == block


def test_precision_is_not_asked_without_pairs(family, monkeypatch):
    """Norms alone do not depend on the matmul precision, so do not ask for it."""
    def fail():
        raise AssertionError("asked for the matmul precision without pairs")

    monkeypatch.setattr(norms_module, "exact_cpu_matmul", fail)
    _check(family, with_pairs=False)


def test_exact_cpu_matmul_falls_back_to_the_legacy_getter_and_never_raises(monkeypatch):
    """A torch without ``torch.backends.mkldnn.matmul.fp32_precision`` (before 2.9): the
    legacy getter decides; where asking raises: the elementwise path (False)."""
    monkeypatch.setattr(torch.backends, "mkldnn", SimpleNamespace())
    for legacy, exact in (("highest", True), ("high", False), ("medium", False)):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda legacy=legacy: legacy)
        assert exact_cpu_matmul() is exact

    def raises():
        raise RuntimeError("mix of the legacy and new APIs")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", raises)
    assert exact_cpu_matmul() is False

    class Raising:
        @property
        def fp32_precision(self):
            raise RuntimeError("unexpected")

    monkeypatch.setattr(torch.backends, "mkldnn", SimpleNamespace(matmul=Raising()))
    assert exact_cpu_matmul() is False
