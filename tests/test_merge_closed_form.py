"""Graph merges (run_merge / mergekit-yaml) against an independent closed form."""

import json
import logging
import os

import pytest
import torch

from checkpoints import closed_form, random_state_dict, save_checkpoint, shard_count
from merging import recipe, run_recipe

MODELS = ("model0", "model1", "model2")


def assert_matches(merged, reference, atol):
    assert set(merged) == set(reference)
    for name, ref in reference.items():
        got = merged[name].double()
        err = (got - ref).abs().max().item()
        assert err < atol, f"{name}: max error {err}"


def test_fixture_is_sharded_and_lambdas_differ(llama_family):
    paths, sds = llama_family
    assert shard_count(paths["base"]) >= 3
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    # distinct noise scales must give clearly distinct coefficients
    assert lams[0] < 0.02 and lams[2] > 0.85


def test_float32_merge_matches_closed_form(llama_family, merge_options, tmp_path, caplog):
    paths, sds = llama_family
    caplog.set_level(logging.INFO, logger="mergekit_metagpt")
    merged = run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)
    lams, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    assert_matches(merged, reference, atol=1e-5)
    # one INFO table with model, ||delta||^2 and lambda
    tables = [r.getMessage() for r in caplog.records if "MetaGPT coefficients" in r.getMessage()]
    assert len(tables) == 1
    for model, lam in zip(MODELS, lams):
        line = next(l for l in tables[0].splitlines() if paths[model] in l)
        assert abs(float(line.split()[-1]) - lam) < 1e-6


def test_bfloat16_merge_matches_closed_form(llama_family_bf16, merge_options, tmp_path):
    paths, sds = llama_family_bf16
    merged = run_recipe(recipe(paths, MODELS, dtype="bfloat16"), str(tmp_path / "out"), merge_options)
    _, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    for name, ref in reference.items():
        assert merged[name].dtype == torch.bfloat16
        expected = ref.to(torch.bfloat16)
        # computed in float32 and rounded once: at most one bf16 ulp from the reference
        diff = (merged[name].float() - expected.float()).abs()
        ulp = expected.float().abs().clamp(min=1e-6) * 2 ** -7
        assert bool((diff <= ulp).all()), name


def test_lambda_scales_the_merged_task_vector(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    merged = run_recipe(
        recipe(paths, MODELS, parameters={"lambda": 0.5}), str(tmp_path / "out"), merge_options
    )
    _, reference = closed_form(sds["base"], [sds[m] for m in MODELS], scale=0.5)
    assert_matches(merged, reference, atol=1e-5)


def test_single_model_gives_that_model(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    merged = run_recipe(recipe(paths, ["model1"]), str(tmp_path / "out"), merge_options)
    assert_matches(merged, {k: v.double() for k, v in sds["model1"].items()}, atol=1e-6)


def test_model_identical_to_base_gets_lambda_zero(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    twin = save_checkpoint(str(tmp_path / "twin"), sds["base"])
    merged = run_recipe(
        recipe({**paths, "twin": twin}, ["twin", "model0", "model2"]), str(tmp_path / "out"), merge_options
    )
    lams, reference = closed_form(sds["base"], [sds["base"], sds["model0"], sds["model2"]])
    assert lams[0] == 0.0
    assert_matches(merged, reference, atol=1e-5)
    # the record says so too (the weights cannot: the twin's task vector is zero)
    with open(tmp_path / "out" / "metagpt_coefficients.json") as f:
        rows = json.load(f)["merges"][0]["models"]
    assert rows[0]["lambda"] == 0.0 and rows[0]["squared_norm"] == 0.0
    assert [row["lambda"] for row in rows[1:]] == pytest.approx(lams[1:], abs=1e-7)


def test_merged_model_loads_and_runs_in_transformers(llama_family, merge_options, tmp_path):
    from transformers import AutoModelForCausalLM

    paths, _ = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("lazy_unpickle", [False, True])
def test_pytorch_bin_checkpoints(lazy_unpickle, llama_family, merge_options, tmp_path):
    """Non-safetensors checkpoints go through mergekit's .bin loader too, with the
    loader settings the merge uses (here --lazy-unpickle), in the pre-pass as in the merge."""
    merge_options = merge_options.model_copy(update={"lazy_unpickle": lazy_unpickle})
    paths, sds = llama_family
    bin_paths = {}
    for name in ("base", "model0", "model2"):
        folder = tmp_path / name
        folder.mkdir()
        torch.save(sds[name], folder / "pytorch_model.bin")
        with open(os.path.join(paths[name], "config.json")) as src:
            (folder / "config.json").write_text(src.read())
        bin_paths[name] = str(folder)
    merged = run_recipe(recipe(bin_paths, ["model0", "model2"]), str(tmp_path / "out"), merge_options)
    _, reference = closed_form(sds["base"], [sds["model0"], sds["model2"]])
    assert_matches(merged, reference, atol=1e-5)


def test_norms_are_those_of_the_inputs_cast_to_the_recipe_dtype(merge_options, tmp_path):
    """`dtype: bfloat16` over float32 checkpoints: mergekit casts each input before the merge,
    and the norms are those of the cast tensors. Model a scales every weight by 1 + 2^-10,
    which bfloat16 rounds away (its cast task vector is zero: λ_a = 0); model b sets one
    norm weight, 0 in the base, to 0.003 (kept). From the float32 files λ_a would be large."""
    base = {k: v.to(torch.bfloat16).float() for k, v in random_state_dict(3).items()}
    name = "model.layers.0.input_layernorm.weight"
    base[name] = torch.zeros_like(base[name])
    a = {k: v * (1 + 2 ** -10) for k, v in base.items()}
    b = dict(base, **{name: torch.full_like(base[name], 0.003)})
    assert all(torch.equal(a[k].to(torch.bfloat16), base[k].to(torch.bfloat16)) for k in base)
    float32_lams, _ = closed_form(base, [a, b])
    assert float32_lams[0] > 0.3  # the float32 reading would differ
    paths = {n: save_checkpoint(str(tmp_path / n), sd) for n, sd in (("base", base), ("a", a), ("b", b))}
    merged = run_recipe(recipe(paths, ["a", "b"], dtype="bfloat16"), str(tmp_path / "out"), merge_options)
    with open(tmp_path / "out" / "metagpt_coefficients.json") as f:
        rows = json.load(f)["merges"][0]["models"]
    assert [row["lambda"] for row in rows] == [0.0, 1.0]
    assert torch.equal(merged[name], torch.full_like(merged[name], 0.003).to(merged[name].dtype))
