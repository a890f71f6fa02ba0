"""Squared norms over tens of millions of elements stay accurate to float64 reference."""

import torch

from mergekit_metagpt.norms import squared_delta, squared_deltas
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


def test_several_models_in_one_pass_match_float64_each():
    """The pre-pass's batched form (the base converted once per chunk for all models)
    gives each model its own exact norm, over several chunks."""
    gen = torch.Generator().manual_seed(1)
    base = (torch.randn(9_000_000, generator=gen) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(9_000_000, generator=gen) * s).to(torch.bfloat16) for s in (0.001, 0.01, 0.1)]
    got = [float(v) for v in squared_deltas(models, base, Scratch())]
    for model, value in zip(models, got):
        exact = float((model.double() - base.double()).pow(2).sum())
        assert abs(value - exact) / exact < 1e-6, (value, exact)
