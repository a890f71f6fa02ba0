"""Squared norms over tens of millions of elements stay accurate to float64 reference."""

import torch

from mergekit_metagpt.norms import squared_delta
from mergekit_metagpt.scratch import Scratch


def test_large_bf16_tensor_norm_matches_float64():
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(20_000_000, generator=gen) * 0.02).to(torch.bfloat16)
    model = (base.float() + torch.randn(20_000_000, generator=gen) * 0.004).to(torch.bfloat16)
    exact = float((model.double() - base.double()).pow(2).sum())
    for scratch in (None, Scratch()):
        got = float(squared_delta(model, base, scratch=scratch))
        # a float32 dot over 20M elements is off by ~1e-4 here
        assert abs(got - exact) / exact < 1e-6, (scratch, got, exact)
