"""Bad input: stock mergekit-yaml exits non-zero, names the problem on its last line,
and writes no weights."""

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from checkpoints import (closed_form, damage_pickle, load_checkpoint, perturbed, random_state_dict, save_bin,
                         save_checkpoint, save_raw)
from merging import run_mergekit_yaml, recipe, safetensors_in, write_yaml

def run_cli(config: dict, tmp_path):
    path = write_yaml(config, str(tmp_path / "recipe.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(path, out)
    lines = [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]
    return result.returncode, (lines[-1] if lines else ""), out, result.stdout + result.stderr


def _copy_into_first_shard(folder: str, offset: float, legacy: bool = False) -> str:
    """Add to the first shard of `folder` a tensor its index puts in the last one (plus
    `offset`; with 0, the same bits and strides); return its name. `legacy`: .bin shards
    saved again in torch's pre-zip format."""
    import json

    from safetensors.torch import load_file, save_file

    (index,) = glob.glob(os.path.join(folder, "*.index.json"))
    with open(index) as handle:
        weight_map = json.load(handle)["weight_map"]
    files = sorted(set(weight_map.values()))
    name = sorted(n for n, f in weight_map.items() if f == files[-1])[0]
    first, last = (os.path.join(folder, f) for f in (files[0], files[-1]))
    if first.endswith(".safetensors"):
        copy = load_file(last)[name]
        save_file({**load_file(first), name: copy + offset if offset else copy}, first, metadata={"format": "pt"})
    else:
        copy = torch.load(last)[name]
        torch.save({**torch.load(first), name: copy + offset if offset else copy}, first,
                   _use_new_zipfile_serialization=not legacy)
        if legacy:
            torch.save(torch.load(last), last, _use_new_zipfile_serialization=False)
    return name


def _quantized_copies(root, good: str) -> dict:
    """Copies of `good`: one with a tensor stored as int8 (a quantized checkpoint's codes,
    with no quantization_config); one quantized as bitsandbytes writes it (its config says
    so, and it holds the scales, `.SCB`, beside its weights); one dequantized that kept its
    config's quantization_config (plain weights: merged, warned of)."""
    import json

    from safetensors.torch import load_file, save_file

    paths = {name: str(root / name) for name in ("int8", "quantized", "dequantized")}
    for path in paths.values():
        shutil.copytree(good, path)
    name = "model.layers.0.mlp.up_proj.weight"

    def shard_of(folder):
        (shard,) = [f for f in glob.glob(os.path.join(folder, "*.safetensors")) if name in load_file(f)]
        return shard, load_file(shard)

    shard, tensors = shard_of(paths["int8"])
    tensors[name] = (tensors[name] * 1000).round().to(torch.int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    shard, tensors = shard_of(paths["quantized"])
    tensors[name.replace(".weight", ".SCB")] = tensors[name].abs().amax(dim=1)
    save_file(tensors, shard, metadata={"format": "pt"})
    (index,) = glob.glob(os.path.join(paths["quantized"], "*.index.json"))
    with open(index) as f:
        data = json.load(f)
    data["weight_map"][name.replace(".weight", ".SCB")] = os.path.basename(shard)
    with open(index, "w") as f:
        json.dump(data, f)
    for which, quantization in (("quantized", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
                                ("dequantized", {"quant_method": "fp8", "weight_block_size": [128, 128]})):
        config_path = os.path.join(paths[which], "config.json")
        with open(config_path) as f:
            config = json.load(f)
        with open(config_path, "w") as f:
            json.dump({**config, "quantization_config": quantization}, f)
    return paths


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base = random_state_dict(7)
    paths = {"base": save_checkpoint(str(root / "base"), base)}
    paths["good"] = save_checkpoint(str(root / "good"), perturbed(base, 0.02, 1))
    paths.update(_quantized_copies(root, paths["good"]))
    paths["a_file"] = sorted(glob.glob(os.path.join(paths["good"], "*.safetensors")))[0]
    for name in ("no_config", "adapter"):
        os.makedirs(root / name)
        for shard in glob.glob(os.path.join(paths["good"], "*.safetensors")):
            os.link(shard, root / name / os.path.basename(shard))
        paths[name] = str(root / name)
    with open(root / "adapter" / "adapter_config.json", "w") as f:
        f.write('{"peft_type": "LORA", "r": 4}')
    # a clone made without git-lfs: a pointer in place of the last shard
    shutil.copytree(paths["good"], root / "lfs_pointer")
    paths["lfs_pointer"] = str(root / "lfs_pointer")
    last = sorted(glob.glob(os.path.join(paths["lfs_pointer"], "*.safetensors")))[-1]
    with open(last, "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")

    wider = random_state_dict(7, intermediate_size=56)
    paths["wider"] = save_checkpoint(str(root / "wider"), wider, intermediate_size=56)
    from safetensors.torch import load_file, save_file

    # good's copy with one weight transposed: as many elements as the base's, in another shape
    shutil.copytree(paths["good"], root / "transposed")
    paths["transposed"] = str(root / "transposed")
    for shard in glob.glob(os.path.join(paths["transposed"], "*.safetensors")):
        tensors = load_file(shard)
        if "model.layers.0.mlp.up_proj.weight" in tensors:
            tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].t().contiguous()
            save_file(tensors, shard, metadata={"format": "pt"})

    deeper = random_state_dict(7, num_hidden_layers=3)
    paths["deeper"] = save_checkpoint(str(root / "deeper"), deeper, num_hidden_layers=3)

    nan = perturbed(base, 0.02, 2)
    nan["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    paths["nan"] = save_checkpoint(str(root / "nan"), nan)

    huge = perturbed(base, 0.02, 8)  # finite, but its square is beyond float32
    huge["model.layers.1.mlp.down_proj.weight"][0, 0] = 3e30
    paths["huge"] = save_checkpoint(str(root / "huge"), huge)

    large = perturbed(base, 0.02, 14)  # finite in float32, Inf once cast to float16
    large["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e5
    paths["large"] = save_checkpoint(str(root / "large"), large)

    inf_base = dict(base)
    inf_base["model.layers.0.post_attention_layernorm.weight"] = base[
        "model.layers.0.post_attention_layernorm.weight"].clone()
    inf_base["model.layers.0.post_attention_layernorm.weight"][5] = float("inf")
    paths["inf_base"] = save_checkpoint(str(root / "inf_base"), inf_base)

    missing = perturbed(base, 0.02, 3)
    del missing["model.layers.1.mlp.up_proj.weight"]
    paths["missing"] = save_raw(str(root / "missing"), missing, like=paths["base"])

    # damaged files: mergekit names neither model nor file (safetensors: "incomplete
    # metadata"; a damaged pickle: IndexError, or a bare "Aborted!" for a single .bin)
    paths["truncated"] = save_checkpoint(str(root / "truncated"), perturbed(base, 0.02, 4))
    shard = sorted(glob.glob(os.path.join(paths["truncated"], "*.safetensors")))[-1]
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) - 64)
    paths["no_shard"] = save_checkpoint(str(root / "no_shard"), perturbed(base, 0.02, 5))
    os.remove(sorted(glob.glob(os.path.join(paths["no_shard"], "*.safetensors")))[1])
    paths["bad_pickle"] = save_bin(str(root / "bad_pickle"), perturbed(base, 0.02, 6), like=paths["base"])
    damage_pickle(os.path.join(paths["bad_pickle"], "pytorch_model-00002-of-00002.bin"))
    paths["bad_bin"] = save_bin(str(root / "bad_bin"), perturbed(base, 0.02, 7), like=paths["base"], shards=1)
    damage_pickle(os.path.join(paths["bad_bin"], "pytorch_model.bin"))

    # a valid .bin of nn.Parameter values (a dict of named_parameters()): torch.load with
    # weights_only, as mergekit reads it, takes it; mergekit's lazy unpickler does not
    params = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in perturbed(base, 0.03, 9).items()}
    paths["param_bin"] = save_bin(str(root / "param_bin"), params, like=paths["base"])

    # a tensor the index puts in one shard, held by another too (a shard saved again alone):
    # mergekit reads whichever copy the shard it has open holds
    for name, offset in (("stale_copy", 0.5), ("equal_copy", 0.0)):
        paths[name] = save_checkpoint(str(root / name), perturbed(base, 0.02, 10))
        _copy_into_first_shard(paths[name], offset)
    paths["stale_bin"] = save_bin(str(root / "stale_bin"), perturbed(base, 0.02, 11), like=paths["base"])
    _copy_into_first_shard(paths["stale_bin"], 0.5)
    paths["stale_legacy_bin"] = save_bin(str(root / "stale_legacy_bin"), perturbed(base, 0.02, 12),
                                         like=paths["base"])
    _copy_into_first_shard(paths["stale_legacy_bin"], 0.5, legacy=True)
    # torch.save keeps strides: matrices stored transposed load as non-contiguous views
    strided = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in perturbed(base, 0.02, 13).items()}
    paths["equal_strided_bin"] = save_bin(str(root / "equal_strided_bin"), strided, like=paths["base"])
    copied = _copy_into_first_shard(paths["equal_strided_bin"], 0.0)
    first = os.path.join(paths["equal_strided_bin"], "pytorch_model-00001-of-00002.bin")
    assert not torch.load(first)[copied].is_contiguous()

    paths["twin1"] = save_checkpoint(str(root / "twin1"), base)
    paths["twin2"] = save_checkpoint(str(root / "twin2"), base)
    return paths, base


CASES = {
    "no base_model": (lambda p: {**recipe(p, ["good", "wider"]), "base_model": None},
                      r"MetaGPT: a MetaGPT recipe needs a base_model: the pre-trained model the fine-tunes share, "
                      r".*\(add `base_model: PATH` to the recipe\)$"),
    "base is the only model": (lambda p: recipe(p, ["base"]), "at least one model besides the base"),
    "tensor shapes differ": (lambda p: recipe(p, ["good", "wider"]),
                             r"shape mismatch for tensor 'model\.layers\.0\.mlp\.[\w.]+'.*/wider"),
    "a tensor transposed": (lambda p: recipe(p, ["good", "transposed"]),
                            r"shape mismatch for tensor 'model\.layers\.0\.mlp\.up_proj\.weight': model "
                            r"\S*/transposed has \(\d+, \d+\)"),
    "NaN in a model": (lambda p: recipe(p, ["good", "nan"]),
                       r"NaN or Inf.*'model\.layers\.1\.self_attn\.k_proj\.weight' of model .*/nan$"),
    "finite values too large to square in float32": (
        lambda p: recipe(p, ["good", "huge"]),
        r"non-finite values \(NaN or Inf, or a task vector too large for float32 sums of squares\) "
        r"in tensor 'model\.layers\.1\.mlp\.down_proj\.weight' of model .*/huge$"),
    "beyond float16 once cast by the recipe's dtype": (
        lambda p: recipe(p, ["good", "large"], dtype="float16"),
        r"non-finite values \(NaN or Inf, or a task vector too large for float32 sums of squares; read as "
        r"float16, which holds nothing beyond ±65504 \(a `dtype: float16` cast of larger values gives Inf\)\) "
        r"in tensor 'model\.layers\.1\.mlp\.up_proj\.weight' of model .*/large$"),
    "a git-lfs pointer for a shard": (
        lambda p: recipe(p, ["good", "lfs_pointer"]),
        r"cannot read model .*/lfs_pointer: its file .*\.safetensors \(holding tensor '[\w.]+'\) is a git-lfs "
        r"pointer, not the weights \(run `git lfs pull` in its repository\)$"),
    "a file given for a model's folder": (
        lambda p: recipe(p, ["good", "a_file"]),
        r"model .*/good/[\w-]+\.safetensors is a file; give the folder that holds it and its config\.json$"),
    "a folder without config.json": (
        lambda p: recipe(p, ["good", "no_config"]),
        r"model .*/no_config has no config\.json \(a model's folder holds one beside its weights\)$"),
    "a LoRA adapter given as a model": (
        lambda p: recipe(p, ["good", "adapter"]),
        r"model .*/adapter is a LoRA adapter \(adapter_config\.json\), not a model; write it after the model it "
        r"adapts, `model: MODEL\+.*/adapter` \(with --lora-merge-cache DIR\)$"),
    "a tensor stored as integers (quantized codes)": (
        lambda p: recipe(p, ["good", "int8"]),
        r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' of model .*/int8 is stored as I8 in .*\.safetensors, where "
        r"the base model's is F32: 8-bit integers are a quantized checkpoint's codes, not its weights .*; merge its "
        r"unquantized checkpoint$"),
    "a quantized model (quantization_config)": (
        lambda p: recipe(p, ["good", "quantized"]),
        r"model .*/quantized is quantized \(quant_method bitsandbytes in its config\.json; it holds "
        r"'model\.layers\.0\.mlp\.up_proj\.SCB'\): it stores codes and scales, not its weights, .*; merge its "
        r"unquantized checkpoint \(or dequantize it first\)$"),
    "Inf in the base": (lambda p: recipe({**p, "base": p["inf_base"]}, ["good"]),
                        r"NaN or Inf.*'model\.layers\.0\.post_attention_layernorm\.weight' of the base model .*/inf_base$"),
    # mergekit's loader or the pre-pass, whichever reads it first
    "missing tensor": (lambda p: recipe(p, ["good", "missing"]),
                       r"(model\.layers\.1\.mlp\.up_proj\.weight required but not present in model .*/missing"
                       r"|/missing has no tensor 'model\.layers\.1\.mlp\.up_proj\.weight')"),
    "unknown parameter": (lambda p: recipe(p, ["good"], parameters={"lambda": 1.0, "weight": 0.5}),
                          r"Unknown parameter\(s\) for metagpt: weight"),
    # copied from a ties recipe: the one parameter of ties that metagpt_ties does not take
    "normalize from a ties recipe": (
        lambda p: recipe(p, ["good"], method="metagpt_ties", parameters={"normalize": True, "int8_mask": True}),
        r"normalize must be false for metagpt_ties, or left out \(got True\): MetaGPT's λ sum to 1 .*as with "
        r"mergekit's normalize: false; normalize: true would divide .*which is not MetaGPT's merge$"),
    # the most common DARE recipe is dare_ties with int8_mask: metagpt_dare elects no signs
    "int8_mask from a dare_ties recipe": (
        lambda p: recipe(p, ["good"], method="metagpt_dare", parameters={"density": 0.5, "int8_mask": True}),
        r"Unknown parameter\(s\) for metagpt_dare: int8_mask .*which metagpt_ties and metagpt_dare_ties do "
        r"\(metagpt_dare is mergekit's dare_linear, DARE without sign election.*: use metagpt_dare_ties for a "
        r"recipe copied from dare_ties, or drop int8_mask$"),
    "rescale from a dare_linear recipe": (
        lambda p: recipe(p, ["good"], method="metagpt_ties", parameters={"density": 0.5, "rescale": False}),
        r"Unknown parameter\(s\) for metagpt_ties: rescale .*which metagpt_dare and metagpt_dare_ties do "
        r"\(metagpt_ties is TIES, which does not rescale.*metagpt_dare for one from dare_linear, or drop "
        r"rescale$"),
    "unknown per-model parameter": (lambda p: {**recipe(p, ["good"]),
                                               "models": [{"model": p["good"], "parameters": {"density": 0.5}}]},
                                    r"Unknown parameter\(s\) for metagpt: density \(given for model .*/good\) \(it takes"
                                    r".*for TIES or DARE sparsification "
                                    r"with MetaGPT's λ, use merge_method: metagpt_ties, metagpt_dare or metagpt_dare_ties$"),
    "negative lambda": (lambda p: recipe(p, ["good"], parameters={"lambda": -0.5}),
                        r"lambda must be a number in \[0, 3.4e38\]"),
    "non-numeric lambda": (lambda p: recipe(p, ["good"], parameters={"lambda": "big"}),
                           r"lambda must be a number in \[0, 3.4e38\]"),
    "per-model density out of range": (
        lambda p: {**recipe(p, ["good"], method="metagpt_ties"),
                   "models": [{"model": p["good"], "parameters": {"density": 0}}]},
        r"parameter density for model .*/good must be a number in \(0, 1\] \(got 0\)$"),
    "granularity not one of its values": (
        lambda p: recipe(p, ["good"], parameters={"granularity": "per_layer"}),
        r"parameter granularity should be 'global' or 'per_tensor' \(got 'per_layer'\)$"),
    "lambda beyond float32": (lambda p: recipe(p, ["good"], parameters={"lambda": 1.0e39}),
                              r"lambda must be a number in \[0, 3.4e38\] \(got 1e\+39\)$"),
    "alpha above 1": (lambda p: recipe(p, ["good"], parameters={"alpha": 1.5}),
                      r"alpha must be a number in \[0, 1\]"),
    # an integer beyond float's range: float() raises OverflowError, which was reported as a bug
    "lambda an integer beyond float": (lambda p: recipe(p, ["good"], parameters={"lambda": 10 ** 400}),
                                       r"lambda must be a number in \[0, 3.4e38\] \(got 1000+… \(401 characters\)\)$"),
    "alpha an integer beyond float": (lambda p: recipe(p, ["good"], parameters={"alpha": 10 ** 400}),
                                      r"alpha must be a number in \[0, 1\] \(got 1000+… \(401 characters\)\)$"),
    "density an integer beyond float": (
        lambda p: recipe(p, ["good"], method="metagpt_ties", parameters={"density": 10 ** 400}),
        r"density must be a number in \(0, 1\] \(got 1000+… \(401 characters\)\)$"),
    "alpha differs between tensors": (
        lambda p: recipe(p, ["good"], parameters={"alpha": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}),
        "alpha must be one value for all tensors of a model set .*got 0.5, 1"),
    # λ from sparsified norms for some tensors and dense ones for the others, which the
    # record, card and CLI described as all sparse
    "lambda_from differs between tensors": (
        lambda p: recipe(p, ["good"], method="metagpt_ties", parameters={
            "density": 0.5, "lambda_from": [{"filter": "mlp", "value": "sparse"}, {"value": "dense"}]}),
        r"lambda_from must be one value for all tensors of a model set .*got dense, sparse: its λ are one "
        r"per model"),
    # mergekit's own message names no key, and for out_dtype comes after the whole pre-pass
    "unknown out_dtype": (lambda p: {**recipe(p, ["good"]), "out_dtype": "fp16"},
                          r"the recipe's out_dtype 'fp16' is not a floating-point dtype mergekit knows"),
    "unknown dtype": (lambda p: {**recipe(p, ["good"]), "dtype": "bf16"},
                      r"the recipe's dtype 'bf16' is not a floating-point dtype mergekit knows"),
    # mergekit knows int64: as out_dtype it wrote every weight as 0, and as dtype it failed
    # mid-merge blaming a norm's weight
    "integer out_dtype": (lambda p: {**recipe(p, ["good"]), "out_dtype": "int64"},
                          r"the recipe's out_dtype 'int64' is not a floating-point dtype mergekit knows"),
    "integer dtype": (lambda p: {**recipe(p, ["good"]), "dtype": "int64"},
                      r"the recipe's dtype 'int64' is not a floating-point dtype mergekit knows"),
    # stock mergekit refuses only the same spelling twice; this one got two λ
    "one model under two spellings": (
        lambda p: {**recipe(p, ["good"]), "models": [{"model": p["good"]},
                                                     {"model": p["good"].rstrip("/") + "/./"}]},
        r"models .*/good and .*/good/\./ are one checkpoint \(.*/good\); list it once"),
    # as a model, the base under another spelling got a λ of its own (1/3 with alpha 0)
    "the base among the models under another spelling": (
        lambda p: {**recipe(p, ["good"], parameters={"alpha": 0}),
                   "models": [{"model": p["good"]}, {"model": p["base"].rstrip("/") + "/./"}]},
        r"model .*/base/\./ is the base model .*/base under another spelling \(.*/base\); write it as the "
        r"base is written"),
    "truncated safetensors shard": (
        lambda p: recipe(p, ["good", "truncated"]),
        r"cannot read model .*/truncated: its file .*/truncated/model-\d+-of-\d+\.safetensors \(holding "
        r"tensor '[\w.]+'\) does not open: SafetensorError: .*not fully covered$"),
    "missing safetensors shard": (
        lambda p: recipe(p, ["good", "no_shard"]),
        r"cannot read model .*/no_shard: its file .*/no_shard/model-00002-of-\d+\.safetensors \(holding "
        r"tensor '[\w.]+'\) is missing$"),
    "damaged pickle in a .bin shard": (
        lambda p: recipe(p, ["good", "bad_pickle"]),
        r"cannot read model .*/bad_pickle: its file .*/bad_pickle/pytorch_model-00002-of-00002\.bin "
        r"\(holding tensor '[\w.]+'\) does not unpickle \(a damaged torch\.save archive\): "),
    "damaged single .bin file": (lambda p: recipe(p, ["good", "bad_bin"]),
                                 r"cannot load model .*/bad_bin: EOFError$"),
    # the pre-pass and the merge read in other orders, so could each take another copy
    "a tensor in two shards": (
        lambda p: recipe(p, ["good", "stale_copy"]),
        r"model .*/stale_copy holds tensor '[\w.]+' in 2 files: .*/stale_copy/model-0+\d-of-0+\d\.safetensors "
        r"\(where its index puts it\) and .*/stale_copy/model-00001-of-0+\d\.safetensors\. .*remove the copies "
        r"the index does not list \(or save the model again\)$"),
    "a tensor in two .bin shards": (
        lambda p: recipe(p, ["good", "stale_bin"]),
        r"model .*/stale_bin holds tensor '[\w.]+' in 2 files: .*/pytorch_model-00002-of-00002\.bin "
        r"\(where its index puts it\) and .*/pytorch_model-00001-of-00002\.bin\."),
    "a tensor in two .bin shards of torch's pre-zip format": (
        lambda p: recipe(p, ["good", "stale_legacy_bin"]),
        r"model .*/stale_legacy_bin holds tensor '[\w.]+' in 2 files: .*/pytorch_model-00002-of-00002\.bin "
        r"\(where its index puts it\) and .*/pytorch_model-00001-of-00002\.bin\."),
    # mergekit: "Repo id must use alphanumeric chars ..."
    "no such model folder": (lambda p: recipe({**p, "gone": p["good"] + "-gone"}, ["good", "gone"]),
                             r"model .*/good-gone: no such folder$"),
    # mergekit: "Unimplemented merge method MetaGPT", mid-planning
    "merge_method in another spelling": (lambda p: recipe(p, ["good"], method="MetaGPT-TIES"),
                                         r"merge_method 'MetaGPT-TIES' is not a method mergekit knows; "
                                         r"did you mean 'metagpt_ties'\?$"),
    "merge_method misspelt": (lambda p: recipe(p, ["good"], method="metagtp"),
                              r"merge_method 'metagtp' is not a method mergekit knows; did you mean 'metagpt'\?$"),
    # mergekit drops keys it does not know: lambda 1 would be merged, or alpha 0.5 everywhere
    "misspelt recipe key": (
        lambda p: {**recipe(p, ["good"]), "paramters": {"lambda": 0.5}},
        r"the recipe key 'paramters' \(at the top level\) is not one mergekit reads: it would be "
        r"ignored silently; did you mean 'parameters'\?$"),
    # mergekit takes "~/m" for a hub id ("Repo id must be in the form ..."), where the
    # plugin's own check had looked for the home's folder and found it
    "a model path with a tilde": (
        lambda p: {**recipe(p, ["good"]), "models": [{"model": "~/models/good"}]},
        r"model ~/models/good: mergekit does not expand ~ \(it would read a folder named '~' in \S+, or ask "
        r"the hub\): write the path in full, \S+/models/good$"),
    # checked before the recipe's other checks, which said "needs a base_model"
    "misspelt base_model key": (
        lambda p: {**{k: v for k, v in recipe(p, ["good"]).items() if k != "base_model"}, "base_modle": p["base"]},
        r"the recipe key 'base_modle' \(at the top level\) is not one mergekit reads: it would be "
        r"ignored silently; did you mean 'base_model'\?$"),
    "misspelt filter": (
        lambda p: recipe(p, ["good"], parameters={"alpha": [{"fliter": "mlp", "value": 0.5}, {"value": 1.0}]}),
        r"the recipe key 'fliter' \(under parameters\.alpha\[0\]\) .*did you mean 'filter'\?$"),
    # mergekit 0.1.5's own message is a bare KeyError: 'defualt'
    "misspelt module name": (
        lambda p: {"merge_method": "metagpt", "base_model": p["base"], "dtype": "float32",
                   "modules": {"defualt": {"models": [{"model": p["base"]}, {"model": p["good"]}]}}},
        r"module 'defualt' of the recipe is not a module of LlamaForCausalLM \(it has: default\); "
        r"did you mean 'default' for 'defualt'\?$"),
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
    assert not os.path.exists(os.path.join(out, "metagpt_coefficients.json")), os.listdir(out)


def test_other_layer_count_is_refused(family, tmp_path):
    paths, _ = family
    rc, last, out, log = run_cli(recipe(paths, ["good", "deeper"]), tmp_path)
    assert rc != 0 and not safetensors_in(out)
    # mergekit 0.1.5 alone: "All inputs to a slice must contain the same number of layers"
    assert re.search(r"the inputs of slice 1 of module default take different numbers of layers \(.*/good: "
                     r"layer_range \[0, 2\], 2 layers; .*/deeper: layer_range \[0, 3\], 3 layers; .*/base: "
                     r"layer_range \[0, 2\], 2 layers\); .*A `models:` recipe takes each model's whole depth", last), last
    # in a slices: recipe, the slice and its ranges as written
    slices = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "slices": [{"sources": [{"model": paths["base"], "layer_range": [0, 2]},
                                      {"model": paths["good"], "layer_range": [0, 2]}]},
                         {"sources": [{"model": paths["base"], "layer_range": [0, 1]},
                                      {"model": paths["deeper"], "layer_range": [1, 3]}]}]}
    rc, last, out, log = run_cli(slices, tmp_path)
    assert rc != 0 and not safetensors_in(out)
    assert re.search(r"slice 2 of module default take different numbers of layers \(.*/base: layer_range "
                     r"\[0, 1\], 1 layer; .*/deeper: layer_range \[1, 3\], 2 layers\)", last), last
    slices["slices"][0]["sources"] = slices["slices"][0]["sources"][:1]  # a slice of the base alone first
    rc, last, out, log = run_cli(slices, tmp_path)
    assert rc != 0 and re.search(r"slice 2 of module default take different numbers of layers", last), last


def test_all_zero_task_vectors_output_the_base_with_warning(family, tmp_path):
    paths, base = family
    rc, last, out, log = run_cli(recipe(paths, ["twin1", "twin2"]), tmp_path)
    assert rc == 0, log
    assert "every task vector is zero" in log
    merged = load_checkpoint(out)
    for name, tensor in base.items():
        assert torch.equal(merged[name], tensor), name
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:  # said as merged: λ 0, not 1/T
        assert [row["lambda"] for row in json.load(f)["merges"][0]["models"]] == [0.0, 0.0]


def test_a_dequantized_model_that_kept_its_quantization_config_is_merged_and_warned_of(family, tmp_path):
    """FP8 models converted to bf16 keep `quantization_config`: no tensor of quantization
    is there, so its tensors are its weights: merged (the closed form), with a warning."""
    paths, base = family
    rc, last, out, log = run_cli(recipe(paths, ["good", "dequantized"]), tmp_path)
    assert rc == 0, log
    assert re.search(r"MetaGPT: model \S*/dequantized's config\.json has a quantization_config \(quant_method "
                     r"fp8\), but it holds no tensor of quantization \(scales, codes\): merged as its tensors are",
                     log), log
    good, dequantized = load_checkpoint(paths["good"]), load_checkpoint(paths["dequantized"])
    _, reference = closed_form(base, [good, dequantized])
    merged = load_checkpoint(out)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_one_model_besides_the_base_is_warned_of(family, tmp_path):
    """With one model its λ is 1 whatever its norm: the merge is plain task arithmetic, said
    (a model left out of a recipe by mistake shows); not said with two."""
    paths, _ = family
    rc, last, out, log = run_cli(recipe(paths, ["good"]), tmp_path)
    assert rc == 0, log
    assert re.search(r"MetaGPT: only one model besides the base \(\S*/good\): its λ is 1, so this merge is stock "
                     r"task_arithmetic with weight 1; MetaGPT weighs two or more models \(list the others beside "
                     r"it\)", log), log
    rc, last, out, log = run_cli(recipe(paths, ["good", "twin1"]), tmp_path)
    assert rc == 0 and "one model besides the base" not in log, log
    rc, last, out, log = run_cli(recipe(paths, ["twin1"]), tmp_path)  # a copy of the base: said as such
    assert rc == 0 and "one model besides the base" not in log and "every task vector is zero" in log, log


def test_a_slice_of_one_model_besides_the_base_is_warned_of(llama_family, tmp_path, caplog):
    """A recipe's model set of one model (here the second slice's): its tensors take λ 1,
    said with the set's number; not said of the set of two."""
    import logging

    from mergekit.options import MergeOptions
    from merging import run_recipe

    paths, _ = llama_family

    def source(name, layers):
        return {"model": paths[name], "layer_range": layers}

    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32", "slices": [
        {"sources": [source("base", [0, 1]), source("model0", [0, 1]), source("model1", [0, 1])]},
        {"sources": [source("base", [1, 2]), source("model2", [1, 2])]},
    ]}
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    run_recipe(config, str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, quiet=True))
    lone = [r.getMessage() for r in caplog.records if "only one model besides the base" in r.getMessage()]
    assert len(lone) == 1, lone
    assert re.fullmatch(r"MetaGPT, model set \d of \d: only one model besides the base \(\S*/model2\): its λ is 1, "
                        r"so its tensors are merged as stock task_arithmetic with weight 1; MetaGPT weighs two or more "
                        r"models \(list the others beside it\)", lone[0]), lone


def test_a_model_equal_to_the_base_is_warned_of(family, tmp_path):
    """λ 0 for a copy of the base: said, not only in the -v table."""
    paths, _ = family
    rc, last, out, log = run_cli(recipe(paths, ["good", "twin1"]), tmp_path)
    assert rc == 0, log
    assert re.search(r"model \S*/twin1 equals the base \(its task vector is zero\): λ 0", log), log
    assert "/good equals the base" not in log


def test_a_bad_value_is_named_with_where_it_is_given():
    """A value in a slice's source, under a filter, at a gradient's end: the message says
    which parameter, model, layers, slice and filter (mergekit's own names none of them)."""
    import yaml

    import mergekit_metagpt  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.recipe_checks import check_config

    def source(model, layers, parameters=None):
        return {"model": model, "layer_range": layers, **({"parameters": parameters} if parameters else {})}

    config = MergeConfiguration.model_validate(yaml.safe_load("""
merge_method: metagpt_ties
base_model: ./base
slices:
  - sources: [{model: ./base, layer_range: [0, 2]}, {model: ./a, layer_range: [0, 2]}]
  - sources:
      - {model: ./base, layer_range: [2, 4]}
      - model: ./a
        layer_range: [2, 4]
        parameters:
          density: [{filter: mlp, value: [0.5, 1.2]}, {value: 0.5}]
"""))
    with pytest.raises(MetaGPTError) as error:
        check_config(config)
    assert str(error.value) == (
        "MetaGPT: parameter density for model ./a (layers 2-4, slice 2, filter mlp) "
        "must be a number in (0, 1] (got 1.2)"
    )
    config.slices[1].sources[1].parameters["density"][0].value = [0.5, 1.0]
    check_config(config)  # every value in range: no error
    # beyond the digits Python prints (4300; from Python, not YAML, which refuses to read
    # it): the message itself failed, naming nothing
    config.slices[1].sources[1].parameters["density"][0].value = [0.5, 10 ** 5000]
    with pytest.raises(MetaGPTError) as error:
        check_config(config)
    assert str(error.value).endswith("must be a number in (0, 1] (got an integer of 16610 bits)")


def test_a_recipe_copied_from_another_method_gets_every_problem_in_one_message():
    """A della recipe turned into metagpt_dare: its keys of other methods (each said why),
    normalize: false (accepted: what MetaGPT does) and a per-model lambda, in one refusal,
    not one round per fix."""
    import yaml

    import mergekit_metagpt  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.recipe_checks import check_config

    config = MergeConfiguration.model_validate(yaml.safe_load("""
merge_method: metagpt_dare
base_model: ./base
parameters: {normalize: false, int8_mask: true, epsilon: 0.05, gamma: 0.01, densty: 0.5}
models:
  - {model: ./a, parameters: {density: 0.5, lambda: 0.9, gamma: 0.02}}
  - {model: ./b, parameters: {density: 0.5, normalize: 0}}
"""))
    with pytest.raises(MetaGPTError) as error:
        check_config(config)
    # each name with where it is given (the top level: nothing said), and a misspelling named
    assert str(error.value).startswith("Unknown parameter(s) for metagpt_dare: densty (did you mean density?), "
                                       "epsilon, gamma (given for model ./a, and for all models), int8_mask "
                                       "(it takes: ")
    assert "normalize" not in str(error.value).split(" (it takes")[0]
    assert ". epsilon sets DELLA's magnitude-ranked drop probabilities (and RAM's threshold); " in str(error.value)
    assert ". gamma is a parameter of mergekit's breadcrumbs, breadcrumbs_ties, not of MetaGPT: remove it" in str(error.value)
    assert "use metagpt_dare_ties for a recipe copied from dare_ties, or drop int8_mask" in str(error.value)
    assert str(error.value).endswith(". Also: Parameter(s) lambda of metagpt_dare apply to the whole merge (one value "
                                     "for every model), but are given for a single model (./a); move them to the "
                                     "top-level (or slice-level) `parameters:`")
    config.parameters = {"normalize": "false"}  # as mergekit reads it: false
    config.models[0].parameters = {"density": 0.5}  # normalize: 0 stays on ./b
    check_config(config)  # normalize: false (top level, and 0 for a model) is accepted
    config.models[0].parameters = {"density": 0.5, "normalize": True}
    with pytest.raises(MetaGPTError, match=r"^normalize must be false for metagpt_dare, or left out \(got True for "
                                           r"model \./a\): MetaGPT's λ sum to 1 "):
        check_config(config)


def test_every_bad_value_of_a_recipe_comes_in_one_message_after_the_unknown_names():
    """Bad values of several parameters, and of one parameter for several models, are
    refused together (with an unknown name before them), not one per run."""
    import yaml

    import mergekit_metagpt  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.recipe_checks import check_config

    config = MergeConfiguration.model_validate(yaml.safe_load("""
merge_method: metagpt_ties
base_model: ./base
parameters: {lambda: -1, lambda_from: sprase, int8_mask: maybe}
models:
  - {model: ./a, parameters: {density: -0.2}}
  - {model: ./b, parameters: {density: "x"}}
  - {model: ./c, parameters: {density: "x"}}
"""))
    with pytest.raises(MetaGPTError) as error:
        check_config(config)
    assert str(error.value) == (
        "MetaGPT: parameter lambda must be a number in [0, 3.4e38] (got -1). "
        "Also: parameter lambda_from should be 'dense' or 'sparse' (got 'sprase'). "
        "Also: parameter int8_mask should be a valid boolean, unable to interpret input (got 'maybe'). "
        "Also: parameter density for model ./a must be a number in (0, 1] (got -0.2). "
        "Also: parameter density for model ./b must be a number in (0, 1] (got 'x'). "
        "Also: parameter density for model ./c must be a number in (0, 1] (got 'x')")
    config.parameters = {"lamda": 2, "lambda": -1}
    config.models = config.models[:1]
    with pytest.raises(MetaGPTError) as error:
        check_config(config)
    assert str(error.value).startswith("Unknown parameter(s) for metagpt_ties: lamda (did you mean lambda?)")
    assert str(error.value).endswith(". Also: parameter lambda must be a number in [0, 3.4e38] (got -1). "
                                     "Also: parameter density for model ./a must be a number in (0, 1] (got -0.2)")


def test_a_caller_of_mergekits_command_still_gets_a_metagpt_error(family, tmp_path):
    """The one-line refusal is click's: a program that calls mergekit-yaml's command with
    standalone_mode=False (click then raises rather than exits) still gets the
    MetaGPTError (a ValueError) it caught before, as a click exception too."""
    import click

    import mergekit_metagpt  # noqa: F401
    from mergekit.scripts import run_yaml
    from mergekit_metagpt.errors import MetaGPTError

    paths, _ = family
    path = write_yaml(recipe(paths, ["good", "twin1"], parameters={"lamda": 0.5}), str(tmp_path / "r.yml"))
    with pytest.raises(MetaGPTError, match="lamda") as error:
        run_yaml.main.main([path, str(tmp_path / "out")], standalone_mode=False)
    assert isinstance(error.value, click.ClickException) and isinstance(error.value, ValueError)


def test_a_mergekit_pytorch_recipe_is_checked_as_a_recipe_is():
    """mergekit-pytorch's config has no modules or slices: its checks (here the missing
    base) say what to fix, not a bug's AttributeError."""
    import mergekit_metagpt  # noqa: F401
    from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.recipe_checks import check_config

    config = RawPyTorchMergeConfig.model_validate({"merge_method": "metagpt", "models": [{"model": "a.safetensors"}]})
    with pytest.raises(MetaGPTError, match="base_model"):
        check_config(config)


def test_a_misspelt_parameter_of_another_variant_is_named_with_its_variants():
    """`densty` under plain metagpt: density is not metagpt's, but the variants'; the
    refusal says both what was meant and where it belongs."""
    import mergekit_metagpt  # noqa: F401
    from mergekit_metagpt.recipe_checks import unknown_parameters_message

    message = unknown_parameters_message("metagpt", {"densty"}, {"alpha", "granularity", "lambda"})
    assert message.startswith("Unknown parameter(s) for metagpt: densty (did you mean density? a parameter of "
                              "metagpt_ties, metagpt_dare, metagpt_dare_ties) (it takes: "), message


def test_the_other_methods_parameters_are_named_whatever_mergekit_registers(monkeypatch):
    """The registry of another mergekit may hold a method of another shape: the refusal
    still comes, naming what it can."""
    import mergekit_metagpt  # noqa: F401
    from mergekit.merge_methods import registry
    from mergekit_metagpt.recipe_checks import unknown_parameters_message

    real = registry.registered_methods()
    monkeypatch.setattr(registry, "registered_methods", lambda: (object(), *real))
    message = unknown_parameters_message("metagpt", {"gamma"}, {"lambda"})
    assert message.endswith(". gamma is a parameter of mergekit's breadcrumbs, breadcrumbs_ties, not of MetaGPT: "
                            "remove it"), message


def test_values_mergekit_never_reads_are_not_checked():
    """A density given for the base (mergekit resolves it for the other models only) and a
    condition after one without a filter (mergekit takes the first that matches) are never
    read: recipes with bad values there merge as before; before them, they are refused."""
    import yaml

    import mergekit_metagpt  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.recipe_checks import check_config

    def config(text):
        return MergeConfiguration.model_validate(yaml.safe_load(text))

    check_config(config("""
merge_method: metagpt_ties
base_model: ./base
models: [{model: ./base, parameters: {density: 0}}, {model: ./a, parameters: {density: 0.5}}]
parameters: {lambda: [{value: 1.0}, {filter: mlp, value: -1}]}
"""))
    with pytest.raises(MetaGPTError, match=r"density for model ./a must be"):
        check_config(config("""
merge_method: metagpt_ties
base_model: ./base
models: [{model: ./base, parameters: {density: 0.5}}, {model: ./a, parameters: {density: 0}}]
"""))
    with pytest.raises(MetaGPTError, match=r"lambda \(filter mlp\) must be"):
        check_config(config("""
merge_method: metagpt
base_model: ./base
models: [{model: ./a}]
parameters: {lambda: [{filter: mlp, value: -1}, {value: 1.0}]}
"""))


def test_a_slice_without_sources_is_named():
    """mergekit's own message for `sources: []` is an IndexError while it plans."""
    import yaml

    import mergekit_metagpt  # noqa: F401
    from mergekit.config import MergeConfiguration
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.recipe_checks import check_config

    config = MergeConfiguration.model_validate(yaml.safe_load("""
merge_method: metagpt
base_model: ./base
modules:
  text:
    slices:
      - sources: [{model: ./base, layer_range: [0, 2]}, {model: ./a, layer_range: [0, 2]}]
      - sources: []
"""))
    with pytest.raises(MetaGPTError, match=r"^slice 2 of module text has no sources"):
        check_config(config)


def test_a_read_that_fails_in_the_pre_pass_names_the_model_and_tensor():
    """A file that goes bad after the plan's check (removed, unreadable) mid-pre-pass: the
    error names the tensor and model, not only the loader's own words."""
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.plan_inputs import TensorRead

    class Leaf:
        tensor = "model.layers.0.mlp.up_proj.weight"

        def execute(self):
            raise OSError("No such file or directory: 'model-00002-of-00004.safetensors'")

    with pytest.raises(MetaGPTError, match=r"^MetaGPT: cannot read tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                           r"of model ./m/math: OSError: No such file"):
        TensorRead("./m/math", Leaf()).load()


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_running_out_of_memory_in_the_pre_pass_is_not_called_bad_input(error):
    """Out of GPU or host memory is the machine's limit, not a bad model: it comes through as
    itself, not as a MetaGPTError (a ValueError, "bad input") blaming the model."""
    from mergekit_metagpt.plan_inputs import TensorRead

    class Leaf:
        tensor = "model.embed_tokens.weight"

        def execute(self):
            raise error

    with pytest.raises(type(error)) as raised:
        TensorRead("./m/math", Leaf()).load()
    assert raised.value is error


@pytest.mark.parametrize("offline, hinted", [("", True), ("0", True), ("false", True), ("1", False), ("TRUE", False)])
def test_the_offline_hint_reads_HF_HUB_OFFLINE_as_the_hub_does(offline, hinted, monkeypatch):
    """A hub model that cannot be loaded: the hint to set HF_HUB_OFFLINE=1 is given unless it
    is on, and huggingface_hub takes "0" and "false" as off."""
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.planning import _check_models_load

    def unreachable(self, trust_remote_code=False):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(ModelReference, "config", unreachable)
    config = MergeConfiguration.model_validate(
        {"merge_method": "metagpt", "base_model": "org/base", "models": [{"model": "org/a"}]})
    with pytest.raises(MetaGPTError, match="cannot load model org/base: OSError: cannot reach") as raised:
        _check_models_load(config, MergeOptions())
    assert ("set HF_HUB_OFFLINE=1 to fail at once" in str(raised.value)) == hinted
    # `org/base` may be a local folder misspelt: the message says where it was looked for
    assert f"read as a hub id: there is no folder org/base in {os.getcwd()}" in str(raised.value)


def test_a_key_mergekit_ignores_is_warned_of(family, tmp_path):
    """A key that misspells none mergekit reads (a note on a shared recipe) is merged, with
    a warning that mergekit ignores it."""
    paths, _ = family
    rc, _, out, log = run_cli({**recipe(paths, ["good"]), "name": "my-merge"}, tmp_path)
    assert rc == 0, log
    assert "mergekit ignores the recipe key 'name' (at the top level; it reads there: base_model," in log, log
    assert safetensors_in(out)


@pytest.mark.parametrize("fault, in_step1, expected", [
    ({"paramters": {"lambda": 0.5}}, False,
     "the recipe key 'paramters' of the final merge (at the top level) is not one "
     "mergekit reads: it would be ignored silently; did you mean 'parameters'?"),
    ({"parameters": {"lamda": 0.5}}, False,
     "MetaGPT: the final merge of the mergekit-multi file: Unknown parameter(s) for metagpt: lamda"),
    ({"parameters": {"lambda": -1}}, True,
     "MetaGPT: merge 'step1' of the mergekit-multi file: parameter lambda must be a number in [0, 3.4e38] (got -1)"),
    ({"merge_method": "MetaGPT"}, False,
     "merge_method 'MetaGPT' is not a method mergekit knows; did you mean 'metagpt'?"),
])
def test_mergekit_multi_refuses_a_bad_later_recipe_before_the_first_merge(fault, in_step1, expected, family,
                                                                          tmp_path):
    """mergekit-multi merges its recipes one after the other; a bad final recipe stopped it
    only after the intermediate merge (minutes to hours on real models). The message names
    the recipe of the file."""
    import subprocess
    import sys

    import yaml

    paths, _ = family
    docs = [{"name": "step1", **recipe(paths, ["good", "twin1"]), **(fault if in_step1 else {})},
            {**recipe(paths, ["good"]), "models": [{"model": "step1"}, {"model": paths["good"]}],
             **({} if in_step1 else fault)}]
    config = str(tmp_path / "multi.yml")
    with open(config, "w") as f:
        yaml.safe_dump_all(docs, f)
    inter, out = tmp_path / "inter", tmp_path / "out"
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mergekit-multi"), config, "--intermediate-dir",
         str(inter), "--out-path", str(out), "--no-copy-tokenizer", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert not (inter / "step1").exists() and not out.exists()


@pytest.mark.parametrize("command", ["mergekit-yaml", "mergekit-multi", "mergekit-pytorch", "debug"])
def test_a_refusal_ends_mergekits_commands_as_one_error_line(command, family, tmp_path):
    """The plugin's refusal (a misspelt parameter here) ends mergekit's commands as click's
    one `Error:` line, where Python printed ~25 lines of traceback before it; with
    MERGEKIT_METAGPT_DEBUG=1 the traceback comes first, then the same line. mergekit-pytorch, which runs no
    run_merge, checked no parameter at all: the misspelt one was ignored and it merged."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    paths, _ = family
    config = recipe(paths, ["good", "twin1"], parameters={"lamda": 0.5})
    if command == "mergekit-pytorch":  # raw files, one per model
        for name in ("base", "good", "twin1"):
            save_file(load_checkpoint(paths[name]), str(tmp_path / f"{name}.safetensors"))
        config = {**config, "base_model": str(tmp_path / "base.safetensors"),
                  "models": [{"model": str(tmp_path / f"{m}.safetensors")} for m in ("good", "twin1")]}
    path = write_yaml(config, str(tmp_path / "recipe.yml"))
    out = tmp_path / "out"
    script = {"debug": "mergekit-yaml"}.get(command, command)
    args = {"mergekit-multi": [path, "--intermediate-dir", str(tmp_path / "inter"), "--out-path", str(out)]}.get(
        command, [path, str(out)])
    env = dict(os.environ, MERGEKIT_METAGPT_DEBUG="1" if command == "debug" else "0")
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), script), *args, "--no-copy-tokenizer"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert not out.exists()
    last = result.stderr.strip().splitlines()[-1]
    message = "Unknown parameter(s) for metagpt: lamda (did you mean lambda?) (it takes: alpha, granularity, lambda)"
    if command == "mergekit-multi":
        message = "MetaGPT: the final merge of the mergekit-multi file: " + message
    if command == "debug":  # the traceback, then the same line
        assert "Traceback" in result.stderr and "MetaGPTError: " + message in result.stderr, result.stderr[-3000:]
        assert last == "Error: " + message, result.stderr[-3000:]
    else:
        assert "Traceback" not in result.stderr and last == "Error: " + message, result.stderr[-3000:]


def test_mergekit_legacy_refuses_its_default_normalize_in_one_line_and_merges_without_it(family, tmp_path):
    """mergekit-legacy writes `normalize: true` unless given --no-normalize: refused as one
    `Error:` line that says to give it (it ended in a traceback, about a normalize the user
    never wrote), nothing written; with --no-normalize it merges to the closed form."""
    import subprocess
    import sys

    paths, base = family
    legacy = os.path.join(os.path.dirname(sys.executable), "mergekit-legacy")
    args = ["--merge", paths["good"], "--merge", paths["param_bin"], "--base-model", paths["base"],
            "--method", "metagpt", "--no-copy-tokenizer"]
    out = tmp_path / "out"
    result = subprocess.run([legacy, str(out), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("Error: mergekit-legacy --method metagpt needs --no-normalize (without it, "
                           "mergekit-legacy writes normalize: true): MetaGPT's λ sum to 1"), last
    assert not out.exists()
    result = subprocess.run([legacy, str(out), *args, "--no-normalize"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _, expected = closed_form(base, [perturbed(base, 0.02, 1), perturbed(base, 0.03, 9)])
    merged = load_checkpoint(str(out))
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name].double(), tensor, atol=1e-6, rtol=1e-5)


def test_a_bin_checkpoint_of_parameters_is_merged(family, tmp_path):
    """The file checks read a .bin as mergekit does: a valid one is not refused."""
    paths, base = family
    rc, _, out, log = run_cli(recipe(paths, ["good", "param_bin"]), tmp_path)
    assert rc == 0, log
    _, expected = closed_form(base, [perturbed(base, 0.02, 1), perturbed(base, 0.03, 9)])
    merged = load_checkpoint(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name].double(), tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, seed", [("equal_copy", 10), ("equal_strided_bin", 13)])
def test_a_tensor_two_shards_hold_alike_is_merged(name, seed, family, tmp_path):
    """Two files holding the same bits under one name (in a .bin, a non-contiguous view too):
    whichever mergekit reads, it reads the same, so the merge goes on, to the closed form."""
    paths, base = family
    rc, _, out, log = run_cli(recipe(paths, ["good", name]), tmp_path)
    assert rc == 0, log
    _, expected = closed_form(base, [perturbed(base, 0.02, 1), perturbed(base, 0.02, seed)])
    merged = load_checkpoint(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name].double(), tensor, atol=1e-6, rtol=1e-5)


def test_a_base_too_large_for_float32_sums_is_not_called_nan():
    """In memory the base's check is a float32 sum of squares: a finite 3e20 overflows it."""
    from mergekit.merge_methods import merge_state_dicts

    from mergekit_metagpt.errors import MetaGPTError

    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=gen)}
    models = {m: {"w": base["w"] + 0.1 * torch.randn(8, 8, generator=gen)} for m in "ab"}
    for sd in (base, *models.values()):
        sd["w"][0, 0] = 3e20
    with pytest.raises(MetaGPTError, match=r"non-finite values \(NaN or Inf, or values too large for float32 "
                                           r"sums\) in tensor 'w' of the base model"):
        merge_state_dicts({"base": base, **models}, "metagpt", base="base")


def test_a_model_beyond_float16_once_cast_in_memory_is_said_to_be_read_as_float16():
    """merge_state_dicts(dtype=float16) of a float32 model holding 1e5: the error says the
    tensor was read as float16 (the Inf is the cast's), not only NaN or Inf."""
    from mergekit.merge_methods import merge_state_dicts

    from mergekit_metagpt.errors import MetaGPTError

    base = {"w": torch.ones(4, 4)}
    large = {"w": torch.ones(4, 4)}
    large["w"][0, 0] = 1e5
    with pytest.raises(MetaGPTError, match=r"; read as float16, which holds nothing beyond ±65504 .* in tensor "
                                           r"'w' of model large"):
        merge_state_dicts({"base": base, "large": large}, "metagpt", base="base", dtype=torch.float16)
    with pytest.raises(MetaGPTError, match=r"for float32 sums of squares\) in tensor 'w' of model large"):
        large["w"][0, 0] = float("inf")  # float32 itself: no word of float16
        merge_state_dicts({"base": base, "large": large}, "metagpt", base="base")


def test_a_recipe_out_dtype_float16_that_overflows_is_refused_naming_the_tensor(tmp_path):
    """mergekit hands a graph merge's method no out_dtype and casts to the recipe's only
    when it writes: a float32 merge beyond ±65504 was written as Inf with `out_dtype:
    float16`, without a word (stock mergekit does the same)."""
    big = "model.layers.0.mlp.up_proj.weight"
    base = random_state_dict(5)
    base[big] = base[big] * (6.4e4 / float(base[big].abs().max()))
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base)}
    for number, name in enumerate(("a", "b")):
        sd = perturbed(base, 0.01, number)
        sd[big] = base[big] * 1.05  # its largest elements beyond float16's ±65504
        paths[name] = save_checkpoint(str(tmp_path / name), sd)
    config = {**recipe(paths, ["a", "b"]), "out_dtype": "float16"}
    rc, last, out, log = run_cli(config, tmp_path)
    assert rc != 0, log
    assert re.search(rf"the merge of tensor '{re.escape(big)}' overflows float16: \d+ values beyond ±65504 "
                     r"\(out_dtype float16 of wider merged values\); merge and write in float32", last), last
    assert not os.path.exists(os.path.join(out, "metagpt_coefficients.json"))
    # the same recipe in float32 merges (the inputs are finite)
    config["out_dtype"] = "float32"
    rc, last, out, log = run_cli(config, tmp_path)
    assert rc == 0, log


@pytest.mark.parametrize("source, card", [(None, True), ("text", True), (None, False)])
def test_a_path_mergekit_cannot_write_into_the_card_is_refused_before_merging(source, card, family, tmp_path):
    """run_merge without the recipe's text (mergekit-multi, Python) serialises the recipe
    for the card after every weight is written: mergekit 0.1.5 fails on a path holding a
    space ("Circular reference detected"): refused before anything is read. With the text
    (mergekit-yaml), or no card, the merge goes through."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_metagpt.errors import MetaGPTError

    paths, _ = family
    spaced = str(tmp_path / "good model")
    os.symlink(paths["good"], spaced)
    config = recipe({**paths, "good": spaced}, ["good"])
    text = write_yaml(config, str(tmp_path / "r.yml")) and open(tmp_path / "r.yml").read()
    out = str(tmp_path / "out")
    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=card)
    merge = lambda: run_merge(MergeConfiguration.model_validate(config), out, options=options,  # noqa: E731
                              config_source=text if source else None)
    if source or not card:
        merge()
        assert safetensors_in(out)
        return
    with pytest.raises(MetaGPTError, match=re.escape(f"model {spaced}: mergekit 0.1.5 cannot serialise it (")
                       + r".*Circular reference detected.*" + re.escape(
            "whatever the method: it writes the recipe into the model card and mergekit_config.yml after the merge")):
        merge()
    assert not os.path.exists(out) or not safetensors_in(out)


COMMIT_BASE, COMMIT_GOOD, COMMIT_OTHER = "b" * 40, "c" * 40, "d" * 40


@pytest.fixture(scope="module")
def hub(family, tmp_path_factory):
    """A hub cache holding the family's base and good model, and another fine-tune."""
    from hub import hub_snapshot

    paths, base = family
    cache = str(tmp_path_factory.mktemp("hub"))
    other = save_checkpoint(str(tmp_path_factory.mktemp("other") / "other"), perturbed(base, 0.05, 11))
    snapshots = {"org/base": hub_snapshot(cache, "org/base", paths["base"], COMMIT_BASE),
                 "org/good": hub_snapshot(cache, "org/good", paths["good"], COMMIT_GOOD),
                 "org/other": hub_snapshot(cache, "org/other", other, COMMIT_OTHER)}
    return cache, snapshots


def run_hub_recipe(config, tmp_path, cache, hub_lists_files=True):
    from hub import run_offline

    path = write_yaml(config, str(tmp_path / "recipe.yml"))
    out = str(tmp_path / "out")
    result = run_offline("mergekit-yaml", [path, out, "--no-copy-tokenizer"], cache,
                         {"MERGEKIT_METAGPT_CACHE_DIR": str(tmp_path / "norm-cache")}, hub_lists_files)
    lines = [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]
    return result, (lines[-1] if lines else ""), out


def test_hub_models_merge_as_their_folders_do(hub, family, tmp_path):
    """Hub ids resolved from the hub cache: the λ and weights of the closed form."""
    cache, snapshots = hub
    config = recipe({"base": "org/base", "good": "org/good", "other": f"org/other@{COMMIT_OTHER}"}, ["good", "other"])
    result, last, out = run_hub_recipe(config, tmp_path, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    models = [load_checkpoint(snapshots[m]) for m in ("org/good", "org/other")]
    _, reference = closed_form(load_checkpoint(snapshots["org/base"]), models)
    merged = load_checkpoint(out)
    assert max((merged[n].double() - ref).abs().max().item() for n, ref in reference.items()) < 1e-5


@pytest.mark.parametrize("spelling", ["snapshot folder", "@main", "@commit"])
def test_a_hub_model_under_two_names_is_refused(spelling, hub, tmp_path):
    """A hub model and its snapshot folder, or the model at its branch or commit, are one
    checkpoint: each listing would get its own λ."""
    cache, snapshots = hub
    second = {"snapshot folder": snapshots["org/good"], "@main": "org/good@main",
              "@commit": f"org/good@{COMMIT_GOOD}"}[spelling]
    config = recipe({"base": "org/base", "good": "org/good", "second": second, "other": "org/other"},
                    ["good", "second", "other"])
    result, last, out = run_hub_recipe(config, tmp_path, cache)
    assert result.returncode != 0
    assert re.search(r"models org/good and \S+ are one checkpoint \(.*/snapshots/c{40}\); list it once", last), last
    assert not os.path.exists(out) or not safetensors_in(out)


def test_the_hub_base_under_another_name_is_refused(hub, tmp_path):
    cache, _ = hub
    config = recipe({"base": "org/base", "good": "org/good", "again": "org/base@main"}, ["again", "good"],
                    parameters={"alpha": 0})
    result, last, out = run_hub_recipe(config, tmp_path, cache)
    assert result.returncode != 0
    assert re.search(r"model org/base@main is the base model org/base under another spelling", last), last
    assert not os.path.exists(out) or not safetensors_in(out)


def test_a_cached_hub_model_without_the_hub_is_pointed_to_its_snapshot_folder(hub, tmp_path):
    """mergekit 0.1.5 asks the hub for a hub model's files even when it is cached: with no
    network the merge cannot start, and the error names the cached folder that works."""
    cache, snapshots = hub
    config = recipe({"base": "org/base", "good": "org/good"}, ["good"])
    result, last, out = run_hub_recipe(config, tmp_path, cache, hub_lists_files=False)
    assert result.returncode != 0
    assert "cannot load model org/base: " in last, last
    assert last.endswith(f"give the cached snapshot's folder instead: {snapshots['org/base']})"), last
    assert not os.path.exists(out) or not safetensors_in(out)


@pytest.mark.parametrize("offline, card", [("", True), ("0", True), ("", False)])
def test_a_local_folder_written_as_a_hub_id_is_warned_of_when_online(offline, card, family, tmp_path, monkeypatch,
                                                                    caplog):
    """Without HF_HUB_OFFLINE, mergekit's card step still asks the hub about `fam/good` after
    the weights: that fails without network (and a hub model of that name would be named
    in the card). A warning at planning, not a refusal; none without a card."""
    import logging

    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from mergekit_metagpt.planning import _check_card_can_name_models

    paths, _ = family
    os.makedirs(tmp_path / "fam")
    os.symlink(paths["good"], tmp_path / "fam" / "good")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    for spelling in ("fam/good", "./fam/good"):
        config = MergeConfiguration.model_validate(recipe({"base": paths["base"], "good": spelling}, ["good"]))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
            _check_card_can_name_models(config, MergeOptions(write_model_card=card))
        warned = [r.getMessage() for r in caplog.records if "written as a hub id would be" in r.getMessage()]
        if card and spelling == "fam/good":
            assert len(warned) == 1 and "fails without network" in warned[0], warned
            # mergekit-multi writes `-I fam`'s intermediate merge `good` as fam/good: the user never wrote it
            assert warned[0].endswith("write it as ./fam/good, or, for an intermediate merge of mergekit-multi, "
                                      "pass -I ./fam (or pass --no-write-model-card)"), warned
        else:
            assert warned == []


def test_a_local_folder_written_as_a_hub_id_is_refused_offline_before_the_merge(family, tmp_path):
    """mergekit's model card step asks the hub about `fam/good` (a local folder written as
    a hub id would be) after every weight is written: with HF_HUB_OFFLINE=1 the merge failed
    at its end, with no card. Refused first; `./fam/good` merges, card included."""
    import subprocess
    import sys

    paths, _ = family
    os.makedirs(tmp_path / "fam")
    os.symlink(paths["good"], tmp_path / "fam" / "good")
    env = dict(os.environ, HF_HUB_OFFLINE="1", MERGEKIT_METAGPT_CACHE="0")
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    for spelling, out in (("fam/good", "refused"), ("./fam/good", "merged")):
        write_yaml(recipe({"base": paths["base"], "good": spelling}, ["good"]), str(tmp_path / f"{out}.yml"))
        result = subprocess.run([script, f"{out}.yml", out, "--no-copy-tokenizer"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        if out == "refused":
            assert result.returncode != 0
            assert ("the local folder fam/good is written as a hub id would be" in result.stderr
                    and "write it as ./fam/good" in result.stderr), result.stderr[-2000:]
            assert not os.path.exists(tmp_path / out) or not safetensors_in(str(tmp_path / out))
        else:
            assert result.returncode == 0, result.stderr[-2000:]
            assert os.path.exists(tmp_path / out / "README.md")


def test_a_misspelt_method_is_told_apart_from_another_method():
    """Close spellings of a variant get it suggested; other methods' names (mergekit's, or a
    MetaGPT-sounding one that is no typo of ours) get none."""
    from mergekit.merge_methods import registry

    from mergekit_metagpt.method import meant_variant

    assert [meant_variant(n) for n in ("metagtp", "meta_gpt", "MetaGPT", "metagpt_tie", "metagpt-dare")] == [
        "metagpt", "metagpt", "metagpt", "metagpt_ties", "metagpt_dare"]
    assert [meant_variant(n) for n in ("metagpt_della", "metagpt_dare_ties", "metagpt")] == [None, None, None]
    assert all(meant_variant(m.spec.name) is None for m in registry.registered_methods())


@pytest.mark.parametrize("offline", ["", "1"])
def test_a_misspelt_local_folder_read_as_a_hub_id_is_said_before_the_hub_is_asked(offline, family, tmp_path,
                                                                                monkeypatch, caplog):
    """`fam/goood`, with `fam/` a folder here: mergekit asks the hub about it (tens of seconds
    of retries without network, before the refusal). A warning comes first, not after; with
    HF_HUB_OFFLINE=1 the refusal is at once and nothing is warned."""
    import logging

    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.planning import _check_models_load

    paths, _ = family
    os.makedirs(tmp_path / "fam")
    os.symlink(paths["good"], tmp_path / "fam" / "good")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    order = []
    import mergekit.common

    real_config = mergekit.common.ModelReference.config

    def ask_the_hub(self, *args, **kwargs):  # stands for mergekit's hub lookup, which would wait
        if self.model.path != "fam/goood":
            return real_config(self, *args, **kwargs)
        order.append(("hub", [r.getMessage() for r in caplog.records]))
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(mergekit.common.ModelReference, "config", ask_the_hub)
    config = MergeConfiguration.model_validate(recipe({"base": paths["base"], "good": "fam/goood"}, ["good"]))
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"), pytest.raises(MetaGPTError):
        _check_models_load(config, MergeOptions())
    (asked,) = [seen for what, seen in order if what == "hub"]
    warned = [m for m in asked if "there is no folder fam/goood" in m]
    if offline:
        assert warned == []
    else:
        assert warned == [f"MetaGPT: model fam/goood: there is no folder fam/goood in {tmp_path}, though fam/ is a "
                          "folder there; mergekit reads it as a hub id and asks the hub about it (tens of seconds "
                          "without network). If you meant a local folder, check its name"]


def test_a_recipe_key_given_twice_is_refused_naming_both_lines(family, tmp_path, capfd):
    """YAML keeps the last of two equal keys without a word: `models:` twice merged only the
    second list's models (stock mergekit too). Refused, by mergekit-yaml and the CLI."""
    from mergekit_metagpt.cli import main

    paths, _ = family
    text = (f"merge_method: metagpt\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['good']}\n"
            f"    parameters:\n      lambda: 1.0\nmodels:\n  - model: {paths['wider']}\n")
    path = tmp_path / "twice.yml"
    path.write_text(text)
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(str(path), out)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and not safetensors_in(out)
    assert last.endswith("the recipe key 'models' (at the top level) is given twice, on lines 3 and 7: YAML "
                         "keeps the last silently, so the first would be left out; merge them into one"), last
    nested = tmp_path / "nested.yml"
    nested.write_text(f"merge_method: metagpt\nbase_model: {paths['base']}\nparameters:\n  lambda: 0.5\n"
                      f"  lambda: 2.0\nmodels:\n  - model: {paths['good']}\n")
    capfd.readouterr()
    assert main(["coefficients", str(nested)]) != 0
    assert capfd.readouterr().err.strip().endswith(
        f"the recipe key 'lambda' of {nested} (under parameters) is given twice, on lines 4 and 5: YAML keeps "
        f"the last silently, so the first would be left out; merge them into one")
    # mergekit-multi: refused before the first merge
    import subprocess
    import sys

    multi = tmp_path / "multi.yml"
    multi.write_text(f"name: step1\nmerge_method: metagpt\nbase_model: {paths['base']}\nmodels:\n"
                     f"  - model: {paths['good']}\n  - model: {paths['twin1']}\n---\n" + text)
    inter = tmp_path / "inter"
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mergekit-multi"), str(multi), "--intermediate-dir",
         str(inter), "--out-path", str(tmp_path / "multi-out"), "--no-copy-tokenizer", "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and not (inter / "step1").exists()
    assert result.stderr.strip().splitlines()[-1].endswith(
        "the recipe key 'models' of the mergekit-multi file (at the top level) is given twice, on lines 10 and 14: "
        "YAML keeps the last silently, so the first would be left out; merge them into one"), result.stderr[-2000:]


def test_yaml_merge_keys_and_keys_of_other_mappings_are_not_duplicates():
    """`<<: *defaults` as often as wanted, and one key in two list items, are no repeats."""
    from mergekit_metagpt.recipe_keys import duplicate_keys

    text = ("a: &a {lambda: 1}\nb: &b {density: 0.5}\nparameters:\n  <<: *a\n  <<: *b\n  lambda: 2\n"
            "models:\n  - model: x\n    parameters: {lambda: 1}\n  - model: y\n    parameters: {lambda: 1}\n")
    assert duplicate_keys(text) == []
    assert duplicate_keys(text + "models: []\n") == [("", "models", 7, 12)]


def test_yaml_aliases_met_again_or_in_a_cycle_are_checked_once(family, tmp_path, capfd):
    """An alias is the node it names: a self-referring one (`&n [a, *n]`, in a key mergekit
    ignores) merged with stock methods but ended the plugin's key checks in a RecursionError;
    aliases of aliases (a YAML "billion laughs") took exponential time."""
    import sys

    from mergekit_metagpt.cli import main
    from mergekit_metagpt.recipe_keys import duplicate_keys

    paths, _ = family
    head = f"merge_method: metagpt\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['good']}\n"
    cycle = tmp_path / "cycle.yml"
    cycle.write_text(head + "x-notes: &n [a, *n]\n")
    assert main(["coefficients", str(cycle)]) == 0
    laughs = head + "".join(f"x-a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10) if i else '1'}]\n" for i in range(4))
    walked = []
    sys.setprofile(lambda frame, event, arg: walked.append(1) if event == "call"
                   and frame.f_code.co_name == "walk" else None)
    try:
        assert duplicate_keys(laughs) == []
    finally:
        sys.setprofile(None)
    assert 0 < len(walked) < 200, len(walked)  # 10 000 leaves through the aliases; 40-odd nodes
    capfd.readouterr()
    cyclic_lambda = tmp_path / "cyclic-lambda.yml"
    cyclic_lambda.write_text(head + "parameters:\n  lambda: &l [0.5, *l]\n")
    assert main(["coefficients", str(cyclic_lambda)]) == 1
    err = capfd.readouterr().err
    assert "RecursionError" not in err and "lambda" in err, err


@pytest.mark.parametrize("content, expected", [
    (b"\0", "is not valid YAML (line 5): unacceptable character #x0000: special characters are not allowed"),
    ("# caf\u00e9\n".encode("latin-1"),
     "is not UTF-8 text (byte 0xe9 at offset {offset}): mergekit-yaml reads recipes as UTF-8; save it as UTF-8"),
])
def test_a_recipe_that_is_not_yaml_text_says_what_and_where(content, expected, family, tmp_path, capfd):
    """A NUL was "not valid YAML: syntax error" (PyYAML's reader error has no problem or
    mark); latin-1 text a bare UnicodeDecodeError naming neither the file nor the fix."""
    from mergekit_metagpt.cli import main

    paths, _ = family
    head = f"merge_method: metagpt\nbase_model: {paths['base']}\nmodels:\n  - model: {paths['good']}\n".encode()
    path = tmp_path / "r.yml"
    path.write_bytes(head + content)
    capfd.readouterr()
    assert main(["coefficients", str(path)]) == 1
    err = capfd.readouterr().err.strip()
    assert err == f"mergekit-metagpt: error: recipe {path} " + expected.format(offset=len(head) + 5), err


def test_an_output_folder_that_is_an_input_s_own_is_refused_before_writing(family, tmp_path):
    """mergekit would overwrite the model's config.json and card and write its shards beside
    the model's, under an index that still names the model's: refused, the folder untouched."""
    paths, _ = family
    own = str(tmp_path / "good")
    shutil.copytree(paths["good"], own)
    before = {name: os.path.getmtime(os.path.join(own, name)) for name in os.listdir(own)}
    result = run_mergekit_yaml(write_yaml(recipe(dict(paths, good=own), ["good"]), str(tmp_path / "r.yml")),
                               own + "/")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last.endswith(f"the output folder {own}/ is model {own}'s own folder: the merge would overwrite its "
                         f"files; give another output folder"), last
    assert {name: os.path.getmtime(os.path.join(own, name)) for name in os.listdir(own)} == before


@pytest.mark.parametrize("kind", ["a file in its way", "a read-only mount"])
def test_an_output_folder_that_takes_no_file_is_refused_before_the_pre_pass(kind, family, tmp_path):
    """mergekit finds it at its first shard, after reading every model (a traceback); the
    plugin before the pre-pass, in one line, and says nothing of an earlier run's record
    that is not there."""
    paths, _ = family
    if kind == "a file in its way":
        (tmp_path / "file").write_text("")
        out = str(tmp_path / "file" / "out")
        reason = "Not a directory"
    else:
        out = str(tmp_path / "ro")
        os.makedirs(out)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", out], capture_output=True).returncode:
            pytest.skip("a read-only mount needs root and mount(8)")
        reason = "Read-only file system"
    try:
        result = run_mergekit_yaml(write_yaml(recipe(paths, ["good"]), str(tmp_path / "r.yml")), out)
    finally:
        if kind == "a read-only mount":
            subprocess.run(["umount", out], check=True)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last == f"Error: cannot write into the output folder {out}: {reason}; give a folder this user can write", \
        result.stderr[-3000:]
    assert "MetaGPT λ" not in result.stderr and "could not remove" not in result.stderr, result.stderr[-3000:]


def test_the_output_folder_check_makes_nothing_and_leaves_nothing(tmp_path):
    """A folder that does not exist yet is checked in the nearest one above it, and not
    made (a merge that fails before mergekit writes leaves no folder); the test file goes."""
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.planning import check_output_writable

    for out in (tmp_path / "a" / "b" / "c", tmp_path):
        check_output_writable(str(out))
        assert not os.path.exists(tmp_path / "a") and os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "b" / "c"):
        with pytest.raises(MetaGPTError, match=f"^cannot write into the output folder {re.escape(str(out))}: "
                                               f"Not a directory; give a folder this user can write$"):
            check_output_writable(str(out))
    assert os.listdir(tmp_path) == ["file"]


def test_a_merge_refused_in_its_pre_pass_leaves_no_folder_it_made(family, tmp_path, merge_options):
    """mergekit makes the output folder before executing the plan, so a merge refused in
    its pre-pass (a NaN) left it there, empty: gone, as it was not there before. A folder
    that was there (empty, or holding a file) stays."""
    from merging import run_recipe
    from mergekit_metagpt.errors import MetaGPTError

    config = recipe(family[0], ["good", "nan"])
    for out, before in ((tmp_path / "new" / "out", None), (tmp_path / "p" / ".." / "q" / "out", None),
                        (tmp_path / "empty", []), (tmp_path / "kept", ["x"])):
        if before is not None:
            out.mkdir()
            for name in before:
                (out / name).write_text("")
        with pytest.raises(MetaGPTError, match="NaN or Inf"):
            run_recipe(config, str(out), merge_options)
        if before is None:  # and the folders above it that mergekit made (p too)
            assert not {"new", "p", "q"} & set(os.listdir(tmp_path)), os.listdir(tmp_path)
        else:
            assert sorted(os.listdir(out)) == before


@contextlib.contextmanager
def _second_name(folder: str, name: str):
    """`folder` reached under a second name that resolves to another string (a bind mount), as
    one folder on a case-insensitive disk (macOS's, Windows') is under ./Good and ./good."""
    os.makedirs(name)
    mounted = subprocess.run(["mount", "--bind", folder, name], capture_output=True).returncode == 0
    try:
        if not mounted:
            pytest.skip("a bind mount (root, mount(8)) stands in for a case-insensitive disk")
        assert os.path.realpath(name) != os.path.realpath(folder)
        yield name
    finally:
        if mounted:
            subprocess.run(["umount", name], check=True)


def test_one_folder_under_two_names_that_resolve_apart_is_one_input(family, tmp_path):
    """On a case-insensitive disk realpath keeps the case typed: an output folder spelt as an
    input's in another case was written into that model (its config.json replaced, shards
    added), and one model listed in two cases got two λ. Compared by device and inode now."""
    paths, _ = family
    own = str(tmp_path / "good")
    shutil.copytree(paths["good"], own)
    before = {name: os.path.getmtime(os.path.join(own, name)) for name in os.listdir(own)}
    with _second_name(own, str(tmp_path / "Good")) as other:
        result = run_mergekit_yaml(write_yaml(recipe(dict(paths, good=own), ["good"]), str(tmp_path / "r.yml")),
                                   other)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and last.endswith(f"the output folder {other} is model {own}'s own folder: "
                                                        "the merge would overwrite its files; give another output "
                                                        "folder"), last
        assert {name: os.path.getmtime(os.path.join(own, name)) for name in os.listdir(own)} == before
        rc, last, out, _ = run_cli({**recipe(paths, ["good"]), "models": [{"model": own}, {"model": other}]},
                                   tmp_path)
        assert rc != 0 and re.search(f"models {own} and {other} are one checkpoint", last), last
        assert not safetensors_in(out)


def test_one_folder_under_names_that_resolve_apart_is_compared_by_inode_or_by_path_without_one(
        tmp_path, monkeypatch):
    """The same without root: a symlink whose realpath is not followed (as macOS keeps the
    case typed) is the folder it names; on a file system that gives no inode (0: some
    network drives on Windows) every folder would be one, so paths are compared there."""
    from types import SimpleNamespace

    from mergekit_metagpt import merge_plan
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.planning import refuse_output_into_an_input

    class System:  # the plugin's view of `os`: spellings resolve to themselves, inodes as given
        def __init__(self, inodes=True):
            self.inodes = inodes
            self.path = SimpleNamespace(**{name: getattr(os.path, name) for name in dir(os.path)
                                           if not name.startswith("_")})
            self.path.realpath = os.path.abspath

        def __getattr__(self, name):
            return getattr(os, name)

        def stat(self, path):
            st = os.stat(path)
            return st if self.inodes else SimpleNamespace(st_dev=st.st_dev, st_ino=0, st_mode=st.st_mode)

    own, other = tmp_path / "good", tmp_path / "else"
    own.mkdir()
    other.mkdir()
    os.symlink(own, tmp_path / "Good")
    monkeypatch.setattr(merge_plan, "os", System())
    assert merge_plan.same_folder(str(own), str(tmp_path / "Good"))
    assert not merge_plan.same_folder(str(own), str(other))
    assert not merge_plan.same_folder(str(own), str(tmp_path / "gone"))
    model = SimpleNamespace(model=SimpleNamespace(path=str(own), revision=None), lora=None)
    monkeypatch.setattr("mergekit_metagpt.planning.models_in_order", lambda config: [model])
    with pytest.raises(MetaGPTError, match="is model .*'s own folder"):
        refuse_output_into_an_input(None, str(tmp_path / "Good"))
    refuse_output_into_an_input(None, str(other))
    monkeypatch.setattr(merge_plan, "os", System(inodes=False))
    assert not merge_plan.same_folder(str(own), str(other))
    assert merge_plan.same_folder(str(own), str(own) + "/.")


def test_a_bin_shard_is_unpickled_once_for_the_file_checks(family, tmp_path, monkeypatch, capfd):
    """The damage, names and dtype checks of a .bin shard share one unpickling (onto meta;
    a legacy pre-zip file is read whole by it)."""
    from collections import Counter

    from mergekit_metagpt import checkpoint_files
    from mergekit_metagpt.cli import main

    paths, _ = family
    checkpoint_files._meta_shard.cache_clear()
    loads = Counter()
    load = checkpoint_files._load_shard

    def counting(path, device):
        loads[(path, device)] += 1
        return load(path, device)

    monkeypatch.setattr(checkpoint_files, "_load_shard", counting)
    recipe_path = write_yaml(recipe(paths, ["good", "param_bin"]), str(tmp_path / "r.yml"))
    assert main(["coefficients", recipe_path]) == 0
    meta = {path: n for (path, device), n in loads.items() if device == "meta"}
    assert len(meta) == 2 and set(meta.values()) == {1}, loads


def test_a_refused_merge_removes_only_the_folders_made_for_it(llama_family, tmp_path, monkeypatch):
    """The output folder is made (for its lock) before the checks; a check that fails removes
    what was made, and only that: with `a/../b/c`, `a` and `b/c` go, an empty `b` that was
    there stays (it was missing only as `a/../b`, while `a` was)."""
    from mergekit.options import MergeOptions
    from merging import run_recipe

    from mergekit_metagpt.errors import MetaGPTError

    paths, _ = llama_family
    monkeypatch.chdir(tmp_path)
    os.mkdir("b")
    config = recipe({**paths, "gone": str(tmp_path / "no-such-model")}, ["model0", "gone"])
    with pytest.raises(MetaGPTError, match="no-such-model"):
        run_recipe(config, os.path.join("a", "..", "b", "c"), MergeOptions(copy_tokenizer=False, quiet=True))
    assert sorted(os.listdir(tmp_path)) == ["b"] and os.listdir("b") == []
