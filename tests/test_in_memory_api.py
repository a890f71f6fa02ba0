"""mergekit's in-memory API: merge_state_dicts and merge_tensors."""

import logging

import pytest
import torch

import mergekit_metagpt  # noqa: F401
from checkpoints import closed_form, perturbed, random_state_dict
from mergekit.merge_methods import merge_state_dicts, merge_tensors


def _models(seed=0):
    base = random_state_dict(seed)
    return {"base": base, "a": perturbed(base, 0.01, 1), "b": perturbed(base, 0.05, 2), "c": perturbed(base, 0.2, 3)}


def test_merge_state_dicts_matches_closed_form_with_global_norms():
    sds = _models()
    merged = merge_state_dicts(sds, "metagpt", base="base")
    lams, reference = closed_form(sds["base"], [sds[k] for k in "abc"])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name
    # global, not per tensor: a per-tensor λ would differ on at least one tensor
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = {k: sds[k][name] - sds["base"][name] for k in "abc"}
    per_tensor = {k: float(d.double().pow(2).sum()) for k, d in deltas.items()}
    tot = sum(per_tensor.values())
    assert any(abs(per_tensor[k] / tot - lam) > 1e-4 for k, lam in zip("abc", lams))


@pytest.mark.parametrize("method", ["metagpt", "metagpt_ties", "metagpt_dare"])
def test_strided_inputs_are_merged_and_never_modified(method):
    """Transposed (non-contiguous) inputs, as in mergekit's own regression test: the
    merge equals the merge of contiguous copies, and no input changes."""
    sds = _models()
    strided = {k: {n: t.t().contiguous().t() if t.dim() == 2 else t for n, t in sd.items()} for k, sd in sds.items()}
    assert any(not t.is_contiguous() for t in strided["a"].values())
    before = {k: {n: t.clone() for n, t in sd.items()} for k, sd in strided.items()}
    params = {} if method == "metagpt" else {"density": 1.0}
    torch.manual_seed(0)
    merged = merge_state_dicts(strided, method, base="base", parameters=params)
    torch.manual_seed(0)
    reference = merge_state_dicts(sds, method, base="base", parameters=params)
    for name, ref in reference.items():
        assert merged[name].shape == ref.shape
        assert torch.allclose(merged[name], ref, atol=1e-6), name
    for k, sd in strided.items():
        assert all(torch.equal(sd[n], before[k][n]) for n in sd), k


def test_repeated_calls_with_same_ids_get_their_own_norms():
    first, second = _models(0), _models(0)
    second["a"] = perturbed(second["base"], 0.5, 9)  # same id, other weights
    merge_state_dicts(first, "metagpt", base="base")
    merged = merge_state_dicts(second, "metagpt", base="base")
    _, reference = closed_form(second["base"], [second[k] for k in "abc"])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_merge_tensors_on_one_tensor():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])
    out = merge_tensors([base, a, b], "metagpt", base_index=0)
    # ||a||²=1, ||b||²=4 → λ = 0.2, 0.8
    assert torch.allclose(out, torch.tensor([0.2, 1.6, 0, 0]))


def test_all_zero_task_vectors_return_base_with_warning(caplog):
    base = random_state_dict(0)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    merged = merge_state_dicts({"base": base, "x": dict(base), "y": dict(base)}, "metagpt", base="base")
    for name in base:
        assert torch.equal(merged[name], base[name])
    assert any("every task vector is zero" in r.getMessage() for r in caplog.records)


def test_in_memory_lambda_parameter():
    sds = _models()
    merged = merge_state_dicts(sds, "metagpt", base="base", parameters={"lambda": 0.3})
    _, reference = closed_form(sds["base"], [sds[k] for k in "abc"], scale=0.3)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5


def test_nan_in_memory_names_model_and_tensor():
    sds = _models()
    sds["b"]["model.norm.weight"] = sds["b"]["model.norm.weight"].clone()
    sds["b"]["model.norm.weight"][3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*model b"):
        merge_state_dicts(sds, "metagpt", base="base")
