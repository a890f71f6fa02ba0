"""LoRA references (`model: base+adapter`): mergekit merges the adapter into
`--lora-merge-cache`; λ are of the merged weights, in the merge and in the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import closed_form, load_checkpoint
from merging import recipe, run_recipe, write_yaml

from mergekit_metagpt.cli import main

RANK, LORA_ALPHA = 4, 8


def make_adapter(base_path: str, out: str, seed: int, scale: float) -> str:
    """A peft LoRA adapter on q_proj/v_proj with non-zero B (a trained adapter's shape)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_path),
        LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
    model.save_pretrained(out)
    return out


def with_adapter(base: dict, adapter: str) -> dict:
    """W + (alpha / r) B A for every adapted weight, from the adapter file alone."""
    lora = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    out = {k: v.clone() for k, v in base.items()}
    prefix = "base_model.model."
    for key in lora:
        if ".lora_A." not in key:
            continue
        target = key[len(prefix):].replace(".lora_A.weight", ".weight")
        a, b = lora[key].double(), lora[key.replace(".lora_A.", ".lora_B.")].double()
        out[target] = (base[target].double() + (LORA_ALPHA / RANK) * b @ a).to(base[target].dtype)
    assert any(not torch.equal(out[k], base[k]) for k in base)
    return out


@pytest.fixture(scope="module")
def adapter(llama_family, tmp_path_factory):
    paths, _ = llama_family
    return make_adapter(paths["base"], str(tmp_path_factory.mktemp("lora") / "adapter"), seed=7, scale=0.05)


def test_merge_and_coefficients_with_a_lora_model(llama_family, adapter, tmp_path, capsys, monkeypatch):
    from mergekit.options import MergeOptions

    paths, sds = llama_family
    lora_model = f"{paths['base']}+{adapter}"
    config = recipe({**paths, "lora": lora_model}, ["model0", "lora", "model1"])
    cache = str(tmp_path / "lora-cache")
    merged = run_recipe(config, str(tmp_path / "out"), MergeOptions(quiet=True, copy_tokenizer=False,
                                                                       lora_merge_cache=cache))

    expected_lams, expected = closed_form(
        sds["base"], [sds["model0"], with_adapter(sds["base"], adapter), sds["model1"]])
    record = json.load(open(tmp_path / "out" / "metagpt_coefficients.json"))
    (entry,) = record["merges"]
    assert [m["lambda"] for m in entry["models"]] == pytest.approx(expected_lams, abs=1e-6)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name].double(), tensor, atol=1e-6, rtol=1e-5)

    # the CLI plans the same recipe with the option passed as to mergekit-yaml, from scratch
    # (neither mergekit's loaders nor the norms of the merge)
    from mergekit.io.tasks import LoaderCache

    from mergekit_metagpt import prepass

    LoaderCache().loaders.clear()
    prepass.clear_memo()
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    recipe_path = write_yaml(config, str(tmp_path / "r.yml"))
    assert main(["coefficients", recipe_path, "--json", "--lora-merge-cache", str(tmp_path / "cli-cache")]) == 0
    (cli_entry,) = json.loads(capsys.readouterr().out)["merges"]
    assert [m["lambda"] for m in cli_entry["models"]] == pytest.approx(expected_lams, abs=1e-6)
    assert os.listdir(tmp_path / "cli-cache")  # the CLI merged the adapter itself


def test_lora_merge_dtype_reaches_the_plan(llama_family, adapter, tmp_path, capsys):
    """--lora-merge-dtype changes the merged weights, so λ: the CLI uses the merge's."""
    from mergekit.options import MergeOptions

    paths, _ = llama_family
    config = recipe({**paths, "lora": f"{paths['base']}+{adapter}"}, ["model0", "lora"])
    recipe_path = write_yaml(config, str(tmp_path / "r.yml"))
    from mergekit.io.tasks import LoaderCache

    lams = {}
    for dtype in ("float32", "bfloat16"):
        # mergekit's LoaderCache (one per process) keeps a loader per reference across merges
        LoaderCache().loaders.clear()
        run_recipe(config, str(tmp_path / dtype), MergeOptions(
            quiet=True, copy_tokenizer=False, lora_merge_dtype=dtype, lora_merge_cache=str(tmp_path / f"m-{dtype}")))
        merge_entry = json.load(open(tmp_path / dtype / "metagpt_coefficients.json"))["merges"][0]
        LoaderCache().loaders.clear()
        assert main(["coefficients", recipe_path, "--json", "--lora-merge-dtype", dtype,
                     "--lora-merge-cache", str(tmp_path / f"c-{dtype}")]) == 0
        cli_entry = json.loads(capsys.readouterr().out)["merges"][0]
        lams[dtype] = [m["lambda"] for m in cli_entry["models"]]
        assert lams[dtype] == pytest.approx([m["lambda"] for m in merge_entry["models"]], abs=1e-7)
    assert abs(lams["float32"][1] - lams["bfloat16"][1]) > 1e-6


def test_cli_names_the_missing_lora_cache(llama_family, adapter, tmp_path, capfd):
    paths, _ = llama_family
    lora_model = f"{paths['base']}+{adapter}"
    recipe_path = write_yaml(recipe({**paths, "lora": lora_model}, ["model0", "lora"]), str(tmp_path / "r.yml"))
    out_dir = tmp_path / "inspect"
    for argv in (["coefficients", recipe_path], ["inspect", recipe_path, str(out_dir)]):
        assert main(argv) == 1
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert lora_model in err and "--lora-merge-cache" in err
    assert not out_dir.exists()
    missing = f"{paths['base']}+{tmp_path / 'no-adapter'}"
    bad = write_yaml(recipe({**paths, "lora": missing}, ["model0", "lora"]), str(tmp_path / "bad.yml"))
    assert main(["coefficients", bad, "--lora-merge-cache", str(tmp_path / "c")]) == 1
    assert "no such LoRA adapter folder" in capfd.readouterr().err


def test_a_lora_merge_dtype_mergekit_does_not_know_is_refused_before_the_adapter_is_merged(
        llama_family, adapter, tmp_path, capfd):
    """mergekit makes the adapter's merge folder, then fails on the dtype; the next run takes
    that empty folder for the merged model. Refused first, from run_merge and the CLI; the
    CLI takes what mergekit-yaml takes (torch.float16)."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    from mergekit_metagpt.errors import MetaGPTError

    paths, _ = llama_family
    config = recipe({**paths, "lora": f"{paths['base']}+{adapter}"}, ["model0", "lora"])
    cache = tmp_path / "lora-cache"
    recipe_path = write_yaml(config, str(tmp_path / "r.yml"))
    for dtype in ("fp16", "int64"):  # unknown; known to mergekit, but no model is built in it
        LoaderCache().loaders.clear()
        expected = f"--lora-merge-dtype {dtype!r} is not a floating-point dtype mergekit knows"
        with pytest.raises(MetaGPTError, match=f"^{expected}"):
            run_recipe(config, str(tmp_path / "out"), MergeOptions(
                quiet=True, copy_tokenizer=False, lora_merge_dtype=dtype, lora_merge_cache=str(cache)))
        assert not cache.exists() or not os.listdir(cache)
        capfd.readouterr()
        assert main(["coefficients", recipe_path, "--lora-merge-dtype", dtype, "--lora-merge-cache", str(cache)]) == 1
        assert f"error: {expected}" in capfd.readouterr().err
        assert not cache.exists() or not os.listdir(cache)
    LoaderCache().loaders.clear()
    assert main(["coefficients", recipe_path, "--lora-merge-dtype", "torch.float16",
                 "--lora-merge-cache", str(cache)]) == 0
    assert os.listdir(cache)
