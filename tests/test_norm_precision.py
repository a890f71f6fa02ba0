"""Squared norms over tens of millions of elements stay accurate to float64 reference."""

import pytest
import torch

from mergekit_metagpt.norms import squared_delta, squared_deltas, task_vector_sums
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


@pytest.mark.parametrize("matmul_precision", ["highest", "medium"])
def test_inner_products_in_the_same_pass_match_float64(matmul_precision, monkeypatch):
    """⟨δ_a, δ_b⟩ of pairs, over several chunks, next to the norms: float64 to 1e-6
    relative (the pairs share a component, so the products are far from zero). With a
    lowered float32 matmul precision (TF32/bf16 allowed), no matrix product is used."""
    from matmul_settings import precision_restored

    from mergekit_metagpt import norms as norms_module

    used = []
    real = norms_module._block_gram
    monkeypatch.setattr(norms_module, "_block_gram", lambda stacked: used.append(1) or real(stacked))
    with precision_restored():  # both of torch's precision APIs as they were
        torch.set_float32_matmul_precision(matmul_precision)
        _check_inner_products()
    assert bool(used) == (matmul_precision == "highest")


def test_inner_products_under_a_callers_cpu_autocast_stay_float32(monkeypatch):
    """A merge or `coefficients` run inside `torch.autocast("cpu")` (bfloat16): the block
    Gram products are the pre-pass's own float32 ones (autocast gave 4e-5 relative errors)."""
    from matmul_settings import precision_restored

    from mergekit_metagpt import norms as norms_module

    used = []
    real = norms_module._block_gram
    monkeypatch.setattr(norms_module, "_block_gram", lambda stacked: used.append(1) or real(stacked))
    with precision_restored(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.set_float32_matmul_precision("highest")
        _check_inner_products()
    assert used


def _check_inner_products():
    gen = torch.Generator().manual_seed(2)
    n = 9_000_000
    base = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    shared = torch.randn(n, generator=gen)
    models = [(base.float() + s * (torch.randn(n, generator=gen) + w * shared)).to(torch.bfloat16)
              for s, w in ((0.001, 1.0), (0.01, 0.5), (0.1, 2.0))]
    pairs = [(0, 1), (0, 2), (1, 2)]
    norms, products, base_sum = task_vector_sums(models, base, Scratch(), check_base=True, pairs=pairs)
    deltas = [m.double() - base.double() for m in models]
    for delta, value in zip(deltas, norms):
        exact = float(delta.pow(2).sum())
        assert abs(float(value) - exact) / exact < 1e-6
    for (i, j), value in zip(pairs, products):
        exact = float((deltas[i] * deltas[j]).sum())
        assert abs(float(value) - exact) / abs(exact) < 1e-6, ((i, j), float(value), exact)
    assert abs(float(base_sum) - float(base.double().sum())) < 1e-3


def test_inspect_json_says_how_the_sums_are_taken():
    """The inspect JSON's "norms" names the sizes the code sums over: the CPU's Gram
    blocks (float32 within a block) and the chunks of both devices."""
    from types import SimpleNamespace

    from mergekit_metagpt.inspect_report import norms_text, payload
    from mergekit_metagpt.norms import GRAM_BLOCK
    from mergekit_metagpt.scratch import CHUNK, CPU_CHUNK

    text = norms_text()
    assert f"per block of {GRAM_BLOCK} elements" in text
    assert f"{CPU_CHUNK} elements (2 MiB of float32) on CPU" in text and f"{CHUNK} (16 MiB) on a GPU" in text
    assert "float64" in text and "exact" in text
    from mergekit_metagpt.set_norms import RunNorms

    run = SimpleNamespace(result=RunNorms(sets=[]), method_name="metagpt", options=None)
    assert payload(run, "recipe.yml")["norms"] == text


def _float64_with_tiny_task_vectors(n=300_000, scales=(1e-9, 3e-9, 1e-10)):
    gen = torch.Generator().manual_seed(3)
    base = 0.05 + torch.rand(n, generator=gen, dtype=torch.float64)  # weights near 0.05-1.05
    return base, [base + torch.randn(n, generator=gen, dtype=torch.float64) * s for s in scales]


def test_float64_tensors_keep_task_vectors_below_float32_resolution():
    """A float64 checkpoint's task vector of ~1e-9 (under float32's step at weights ~0.5):
    norms and inner products match float64, where float32 differences lost most of them."""
    base, xs = _float64_with_tiny_task_vectors()
    deltas = [x - base for x in xs]
    want = [float(d @ d) for d in deltas]
    lost = float(((xs[2].float() - base.float()).double() ** 2).sum())
    assert abs(lost - want[2]) / want[2] > 0.5  # what float32 differences give
    scratch = Scratch()
    norms, products, _ = task_vector_sums(xs, base, scratch, pairs=[(0, 1), (1, 2)])
    assert [float(v) for v in norms] == pytest.approx(want, rel=1e-10)
    assert float(products[0]) == pytest.approx(float(deltas[0] @ deltas[1]), rel=1e-6, abs=1e-12 * want[1])
    assert [float(v) for v in squared_deltas(xs, base, scratch)] == pytest.approx(want, rel=1e-10)
    assert float(squared_delta(xs[2], base)) == pytest.approx(want[2], rel=1e-10)


def test_float64_checkpoints_merge_with_their_float64_lambdas(tmp_path, merge_options):
    """End to end (pre-pass, record): a float64 LLaMA family whose task vectors are ~1e-9."""
    import json

    import mergekit_metagpt  # noqa: F401
    from checkpoints import closed_form, random_state_dict, save_checkpoint
    from merging import recipe, run_recipe

    base = random_state_dict(0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    sds = {"base": base}
    for i, scale in enumerate((1e-9, 3e-9, 1e-10)):
        sds[f"model{i}"] = {k: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) * scale
                            for k, v in base.items()}
    paths = {name: save_checkpoint(str(tmp_path / name), sd) for name, sd in sds.items()}
    models = ["model0", "model1", "model2"]
    merged = run_recipe(recipe(paths, models, dtype="float64"), str(tmp_path / "out"), merge_options)
    lams, reference = closed_form(sds["base"], [sds[m] for m in models])
    (entry,) = json.load(open(tmp_path / "out" / "metagpt_coefficients.json"))["merges"]
    assert [m["lambda"] for m in entry["models"]] == pytest.approx(lams, rel=1e-8)
    for name, ref in reference.items():
        assert merged[name].dtype == torch.float64
        assert (merged[name] - ref).abs().max().item() < 1e-15, name
