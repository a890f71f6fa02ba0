"""Bad input: stock mergekit-yaml exits non-zero, names the problem on its last line,
and writes no weights."""

import os
import re

import pytest
import torch

from checkpoints import load_checkpoint, perturbed, random_state_dict, save_checkpoint, save_raw
from merging import run_mergekit_yaml, recipe, safetensors_in, write_yaml

def run_cli(config: dict, tmp_path):
    path = write_yaml(config, str(tmp_path / "recipe.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(path, out)
    lines = [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]
    return result.returncode, (lines[-1] if lines else ""), out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = random_state_dict(7)
    paths = {"base": save_checkpoint(str(root / "base"), base)}
    paths["good"] = save_checkpoint(str(root / "good"), perturbed(base, 0.02, 1))

    wider = random_state_dict(7, intermediate_size=56)
    paths["wider"] = save_checkpoint(str(root / "wider"), wider, intermediate_size=56)

    deeper = random_state_dict(7, num_hidden_layers=3)
    paths["deeper"] = save_checkpoint(str(root / "deeper"), deeper, num_hidden_layers=3)

    nan = perturbed(base, 0.02, 2)
    nan["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    paths["nan"] = save_checkpoint(str(root / "nan"), nan)

    inf_base = dict(base)
    inf_base["model.layers.0.post_attention_layernorm.weight"] = base[
        "model.layers.0.post_attention_layernorm.weight"].clone()
    inf_base["model.layers.0.post_attention_layernorm.weight"][5] = float("inf")
    paths["inf_base"] = save_checkpoint(str(root / "inf_base"), inf_base)

    missing = perturbed(base, 0.02, 3)
    del missing["model.layers.1.mlp.up_proj.weight"]
    paths["missing"] = save_raw(str(root / "missing"), missing, like=paths["base"])

    paths["twin1"] = save_checkpoint(str(root / "twin1"), base)
    paths["twin2"] = save_checkpoint(str(root / "twin2"), base)
    return paths, base


CASES = {
    "no base_model": (lambda p: {**recipe(p, ["good", "wider"]), "base_model": None}, "needs a base_model"),
    "base is the only model": (lambda p: recipe(p, ["base"]), "at least one model besides the base"),
    "tensor shapes differ": (lambda p: recipe(p, ["good", "wider"]),
                             r"shape mismatch for tensor 'model\.layers\.0\.mlp\.[\w.]+'.*/wider"),
    "NaN in a model": (lambda p: recipe(p, ["good", "nan"]),
                       r"NaN or Inf.*'model\.layers\.1\.self_attn\.k_proj\.weight' of model .*/nan$"),
    "Inf in the base": (lambda p: recipe({**p, "base": p["inf_base"]}, ["good"]),
                        r"NaN or Inf.*'model\.layers\.0\.post_attention_layernorm\.weight' of the base model .*/inf_base$"),
    # mergekit's loader or the pre-pass, whichever reads it first
    "missing tensor": (lambda p: recipe(p, ["good", "missing"]),
                       r"(model\.layers\.1\.mlp\.up_proj\.weight required but not present in model .*/missing"
                       r"|/missing has no tensor 'model\.layers\.1\.mlp\.up_proj\.weight')"),
    "unknown parameter": (lambda p: recipe(p, ["good"], parameters={"lambda": 1.0, "weight": 0.5}),
                          r"Unknown parameter\(s\) for metagpt: weight"),
    "unknown per-model parameter": (lambda p: {**recipe(p, ["good"]),
                                               "models": [{"model": p["good"], "parameters": {"density": 0.5}}]},
                                    r"Unknown parameter\(s\) for metagpt: density"),
    "negative lambda": (lambda p: recipe(p, ["good"], parameters={"lambda": -0.5}),
                        "lambda must be a finite number >= 0"),
    "non-numeric lambda": (lambda p: recipe(p, ["good"], parameters={"lambda": "big"}),
                           "lambda must be a finite number >= 0"),
    "alpha above 1": (lambda p: recipe(p, ["good"], parameters={"alpha": 1.5}),
                      r"alpha must be a number in \[0, 1\]"),
    "alpha differs between tensors": (
        lambda p: recipe(p, ["good"], parameters={"alpha": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}),
        "alpha must be one value for all tensors of a model set .*got 0.5, 1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_early_and_clearly(case, family, tmp_path):
    paths, _ = family
    build, expected = CASES[case]
    config = {k: v for k, v in build(paths).items() if v is not None}
    rc, last, out, log = run_cli(config, tmp_path)
    assert rc != 0, log
    assert re.search(expected, last), last
    assert not safetensors_in(out), os.listdir(out)


def test_other_layer_count_is_refused(family, tmp_path):
    paths, _ = family
    rc, last, out, log = run_cli(recipe(paths, ["good", "deeper"]), tmp_path)
    assert rc != 0 and not safetensors_in(out)
    assert "layers" in last or "shape" in last, last


def test_all_zero_task_vectors_output_the_base_with_warning(family, tmp_path):
    paths, base = family
    rc, last, out, log = run_cli(recipe(paths, ["twin1", "twin2"]), tmp_path)
    assert rc == 0, log
    assert "every task vector is zero" in log
    merged = load_checkpoint(out)
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor), name
