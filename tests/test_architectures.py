"""Architectures besides LLaMA, each as mergekit 0.1.5 defines it, merged by stock
mergekit-yaml against a float64 closed form over the tensors the merge writes.

Each family is a tiny randomly initialised model (transformers' own class for the
architecture) and three fine-tune-like copies with noise of distinct scales per model
and per tensor, so that the λ differ clearly and a tensor counted twice, or missed, moves
them. What these guard: the pre-pass reads what mergekit's plan reads under other
architectures' names (biases, fused projections, extra norms, MoE experts, tied heads).
"""

from __future__ import annotations

import json
import re
import os

import pytest
import torch

from checkpoints import load_checkpoint
from merging import run_mergekit_yaml, write_yaml

RECORD = "metagpt_coefficients.json"
SCALES = (0.004, 0.02, 0.01)  # per model: the λ differ by far more than float noise

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# architecture: (transformers config class, its settings); each has mergekit 0.1.5 JSON
ARCHITECTURES = {
    "Qwen2ForCausalLM": ("Qwen2Config", dict(SMALL, tie_word_embeddings=False)),  # q/k/v biases
    "Qwen3ForCausalLM": ("Qwen3Config", dict(SMALL, head_dim=8, tie_word_embeddings=False)),  # q/k norms
    "MistralForCausalLM": ("MistralConfig", dict(SMALL, tie_word_embeddings=False)),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(SMALL, head_dim=8)),  # tied head, four norms a layer
    "Phi3ForCausalLM": ("Phi3Config", dict(SMALL, tie_word_embeddings=False, pad_token_id=0)),  # fused qkv
    "MixtralForCausalLM": ("MixtralConfig", dict(SMALL, num_local_experts=4, num_experts_per_tok=2,
                                                 tie_word_embeddings=False)),  # experts
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    # modular: two modules (encoder, decoder) planned apart and merged as one set, their
    # norms summed; the shared embedding read under a tied name; optional weights without
    # tied names (relative_attention_bias beyond block 0) absent from the files
    "T5ForConditionalGeneration": ("T5Config", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                    num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu")),
    # a vision tower, a projector and a language model, three modules of one set
    "Mistral3ForConditionalGeneration": ("Mistral3Config", dict(
        text_config=dict(model_type="mistral", **dict(SMALL, head_dim=8)),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, head_dim=8, image_size=32, patch_size=4),
        spatial_merge_size=2)),
    # mergekit 0.1.5 plans the projector's four tensors once per "layer" (templates without a
    # layer index) and writes each once: they count once
    "Qwen2VLForConditionalGeneration": ("Qwen2VLConfig", dict(
        text_config=dict(SMALL, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, in_channels=3, temporal_patch_size=2))),
}
#: config.json keys mergekit 0.1.5 reads that transformers no longer writes at the top level
CONFIG_KEYS = {"Qwen2VLForConditionalGeneration": {"num_hidden_layers": SMALL["num_hidden_layers"]}}


def _family(root: str, architecture: str):
    """Base and three noisy copies saved by transformers; their state dicts as saved."""
    import transformers
    from safetensors.torch import load_file

    config_class, settings = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).to(torch.float32)
    paths, sds = {}, {}
    gen = torch.Generator().manual_seed(1)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for index, name in enumerate(["base", "a", "b", "c"]):
        if index:
            scale = SCALES[index - 1]
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    if param.is_floating_point():
                        # a scale of its own per tensor too, so that no tensor is interchangeable
                        factor = 0.5 + torch.rand((), generator=gen).item()
                        param.copy_(base[key] + scale * factor * torch.randn(param.shape, generator=gen))
        path = os.path.join(root, name)
        model.save_pretrained(path, safe_serialization=True)
        if architecture in CONFIG_KEYS:
            with open(os.path.join(path, "config.json")) as f:
                saved = json.load(f)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({**saved, **CONFIG_KEYS[architecture]}, f)
        paths[name] = path
        sds[name] = {k: v for f in sorted(os.listdir(path)) if f.endswith(".safetensors")
                     for k, v in load_file(os.path.join(path, f)).items()}
    return paths, sds


def _closed_form(sds, output_names):
    """λ and merged tensors in float64, the norms over the tensors the output holds, each
    read under its own name from every input (as saved: a tied head is not in the files)."""
    models = ["a", "b", "c"]
    norms = []
    for m in models:
        norms.append(sum(float(((sds[m][k].double() - sds["base"][k].double()) ** 2).sum())
                         for k in output_names if sds["base"][k].is_floating_point()))
    lams = [n / sum(norms) for n in norms]
    merged = {}
    for k in output_names:
        base = sds["base"][k].double()
        merged[k] = base + sum(lam * (sds[m][k].double() - base) for lam, m in zip(lams, models))
    return lams, merged


def _merge(paths, tmp_path, name, method="metagpt", weights=None):
    recipe = {"merge_method": method, "base_model": paths["base"], "dtype": "float32",
              "models": [{"model": paths[m], **({"parameters": {"weight": w}} if weights else {})}
                         for m, w in zip("abc", weights or [None] * 3)]}
    if weights:
        recipe["parameters"] = {"normalize": False}
    out = str(tmp_path / name)
    result = run_mergekit_yaml(write_yaml(recipe, str(tmp_path / f"{name}.yml")), out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, load_checkpoint(out)


@pytest.mark.parametrize("architecture", sorted(set(ARCHITECTURES) - {"MixtralForCausalLM"}))
def test_an_architecture_merges_to_the_closed_form(architecture, tmp_path):
    paths, sds = _family(str(tmp_path / "models"), architecture)
    out, merged = _merge(paths, tmp_path, "out")
    # the merge writes the checkpoint's tensors: none left out, none made up
    assert set(merged) == set(sds["base"]), set(merged) ^ set(sds["base"])
    lams, expected = _closed_form(sds, sorted(merged))
    with open(os.path.join(out, RECORD)) as f:
        (entry,) = json.load(f)["merges"]
    got = [m["lambda"] for m in entry["models"]]
    assert got == pytest.approx(lams, abs=1e-7), (got, lams)
    assert max(lams) - min(lams) > 0.1  # distinct: a tensor counted twice or missed would show
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name].double(), tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_mixtral_experts_converted_by_mergekit(tmp_path):
    """transformers saves Mixtral's experts one tensor each (``block_sparse_moe.experts.N.w1``);
    mergekit 0.1.5 plans the fused names of transformers 5 (``mlp.experts.gate_up_proj``) and
    builds each from the checkpoint's tensors as it loads it. The pre-pass reads through the
    same loads: the λ are those of the checkpoint as saved (the conversion moves elements, it
    changes none), and the merge equals stock task_arithmetic with the λ as weights."""
    paths, sds = _family(str(tmp_path / "models"), "MixtralForCausalLM")
    out, merged = _merge(paths, tmp_path, "out")
    assert any(".block_sparse_moe.experts.0.w1." in k for k in sds["base"])
    assert any(".mlp.experts.gate_up_proj" in k for k in merged)
    lams, _ = _closed_form(sds, sorted(sds["base"]))
    with open(os.path.join(out, RECORD)) as f:
        (entry,) = json.load(f)["merges"]
    got = [m["lambda"] for m in entry["models"]]
    assert got == pytest.approx(lams, abs=1e-7), (got, lams)
    assert max(lams) - min(lams) > 0.1
    _, stock = _merge(paths, tmp_path, "stock", method="task_arithmetic", weights=got)
    assert set(merged) == set(stock)
    for name, tensor in stock.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_a_modules_recipe_that_leaves_a_module_out_is_warned_of(tmp_path, caplog):
    """mergekit writes none of the weights of a module a `modules:` recipe leaves out (T5's
    `shared`: the embeddings), with no message; the plugin names it, before any reading."""
    import logging

    from mergekit_metagpt.cli import main

    paths, _ = _family(str(tmp_path / "models"), "T5ForConditionalGeneration")

    def modules(names):
        return {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
                "modules": {name: {"models": [{"model": paths[m]} for m in "abc"]} for name in names}}

    warning = "the recipe's modules: leave out 'shared' of T5ForConditionalGeneration: mergekit merges and " \
              "writes none of its weights"
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
        assert main(["coefficients", "--quiet", write_yaml(modules(["encoder", "decoder"]),
                                                           str(tmp_path / "left-out.yml"))]) == 0
    assert warning in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
        assert main(["coefficients", "--quiet", write_yaml(modules(["shared", "encoder", "decoder"]),
                                                           str(tmp_path / "all.yml"))]) == 0
    assert "leave out" not in caplog.text


@pytest.mark.parametrize("optional, warned", [(True, False), (False, True)])
def test_a_left_out_module_is_warned_of_only_with_weights_mergekit_requires(optional, warned, caplog):
    """A module all of whose weights mergekit marks optional may be absent from the models:
    leaving it out loses nothing it would write, so no warning."""
    import logging
    from types import SimpleNamespace as Namespace

    from mergekit_metagpt.recipe_checks import check_module_names

    def module(*optionals):
        weights = [Namespace(optional=o) for o in optionals]
        return Namespace(architecture=Namespace(all_weights=lambda config: weights if config == "cfg" else []))

    arch = Namespace(modules={"decoder": module(False), "extra": module(True, optional)}, architectures=["X"])
    config = Namespace(modules={"decoder": {}}, base_model=Namespace(config=lambda trust_remote_code: "cfg"))
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
        check_module_names(config, arch)
    assert ("leave out 'extra' of X" in caplog.text) == warned, caplog.text


def _neox_family(root):
    """GPT-NeoX as older checkpoints hold it: a bool causal mask (attention.bias) beside the
    float weights; and a base whose mask a cast-everything script made float16."""
    from safetensors.torch import save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=16, rotary_pct=0.25,
                           architectures=["GPTNeoXForCausalLM"])
    torch.manual_seed(0)
    base = {k.replace("lm_head.", "embed_out."): v.detach().clone().contiguous()
            for k, v in GPTNeoXForCausalLM(config).state_dict().items()}
    fixed = set()  # buffers mergekit's gpt_neox definition requires, the same in every model
    for i in range(config.num_hidden_layers):
        prefix = f"gpt_neox.layers.{i}.attention."
        base[prefix + "bias"] = torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16)
        base[prefix + "masked_bias"] = torch.tensor(-1e9)
        base[prefix + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 2, 2).float() / 2))
        fixed |= {prefix + "masked_bias", prefix + "rotary_emb.inv_freq"}
    paths = {}

    def save(name, sd):
        paths[name] = os.path.join(root, name)
        os.makedirs(paths[name])
        config.save_pretrained(paths[name])
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(paths[name], "model.safetensors"),
                  metadata={"format": "pt"})

    save("base", base)
    for seed, scale in ((1, 0.02), (2, 0.05)):
        generator = torch.Generator().manual_seed(seed)
        save(f"ft{seed}", {k: v + scale * torch.randn(v.shape, generator=generator)
                           if v.is_floating_point() and k not in fixed else v for k, v in base.items()})
    save("base_f16mask", {k: v.to(torch.float16) if v.dtype == torch.bool else v for k, v in base.items()})
    return paths


def test_a_bool_mask_beside_the_weights_is_neither_refused_nor_read_again(tmp_path, monkeypatch):
    """A non-float tensor of the base adds nothing to a norm (0.0, not the "model lacks it"
    of an absent optional tensor): a cached rerun takes it from the cache without a warning.
    A bool mask where the base's is float16 is no quantized code: merged, not refused."""
    paths = _neox_family(str(tmp_path / "models"))
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = {"merge_method": "metagpt", "base_model": paths["base"],
              "models": [{"model": paths["ft1"]}, {"model": paths["ft2"]}]}
    records = []
    for run in ("first", "cached"):
        out = str(tmp_path / run)
        result = run_mergekit_yaml(write_yaml(recipe, str(tmp_path / f"{run}.yml")), out)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "lacks tensor" not in result.stderr, result.stderr[-3000:]
        with open(os.path.join(out, RECORD)) as f:
            records.append([m["lambda"] for m in json.load(f)["merges"][0]["models"]])
    assert records[0] == records[1] and abs(records[0][0] - records[0][1]) > 0.5
    f16 = {**recipe, "base_model": paths["base_f16mask"], "dtype": "float32"}
    result = run_mergekit_yaml(write_yaml(f16, str(tmp_path / "f16.yml")), str(tmp_path / "f16"))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("found_by", ["pre-pass", "merge task"])
def test_a_mask_that_differs_from_the_base_is_named_with_its_model(found_by, tmp_path, merge_options,
                                                                   monkeypatch, capsys):
    """A fine-tune's bool mask that differs from the base's: mergekit merges no such tensor
    and stops at it ('Non-floating buffer … differs', naming no model), in its executor's
    order, possibly after the λ are out. Named with the model and tensor, before any weights
    are written: by the pre-pass (and `coefficients`), and by the merge's task where the
    pre-pass does not read it (here: its check switched off)."""
    from safetensors.torch import load_file, save_file

    from merging import run_recipe
    from mergekit_metagpt import prepass
    from mergekit_metagpt.cli import main
    from mergekit_metagpt.errors import MetaGPTError

    paths = _neox_family(str(tmp_path / "models"))
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    file = os.path.join(paths["ft2"], "model.safetensors")
    sd = load_file(file)
    sd["gpt_neox.layers.1.attention.bias"][0, 0, 0, 5] = True  # one more position attended
    save_file(sd, file, metadata={"format": "pt"})
    recipe = {"merge_method": "metagpt", "base_model": paths["base"],
              "models": [{"model": paths["ft1"]}, {"model": paths["ft2"]}]}
    named = (r"tensor 'gpt_neox\.layers\.1\.attention\.bias' of model .*/ft2 differs from the base's, "
             r"and the base model .*/base stores it as torch\.bool: mergekit merges no tensor that is not "
             r"floating point")
    if found_by == "pre-pass":
        assert main(["coefficients", write_yaml(recipe, str(tmp_path / "r.yml"))]) == 1
        assert re.search(named, capsys.readouterr().err)
    else:
        monkeypatch.setattr(prepass, "refuse_other_buffer", lambda *args: None)
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match=named):
        run_recipe(recipe, out, merge_options)
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]


@pytest.mark.parametrize("found_by", ["pre-pass", "merge task"])
def test_an_integer_copy_of_a_float_weight_is_named_with_its_model(found_by, tmp_path, merge_options,
                                                                   monkeypatch, capsys):
    """A fine-tune that stores as int64 a weight the base stores as floating point (no
    `dtype:` in the recipe, so mergekit converts nothing): named with model and tensor
    before any weights are written, by the pre-pass, and by the merge's task where the
    pre-pass lets it through (here: its check switched off)."""
    from safetensors.torch import load_file, save_file

    from merging import run_recipe
    from mergekit_metagpt import prepass
    from mergekit_metagpt.cli import main
    from mergekit_metagpt.errors import MetaGPTError

    paths = _neox_family(str(tmp_path / "models"))
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    file = os.path.join(paths["ft2"], "model.safetensors")
    sd = load_file(file)
    name = "gpt_neox.layers.0.input_layernorm.weight"
    sd[name] = sd[name].round().to(torch.int64)
    save_file(sd, file, metadata={"format": "pt"})
    recipe = {"merge_method": "metagpt", "base_model": paths["base"],
              "models": [{"model": paths["ft1"]}, {"model": paths["ft2"]}]}
    named = (r"tensor 'gpt_neox\.layers\.0\.input_layernorm\.weight' of model .*/ft2 is torch\.int64, "
             r"but floating point in the base model .*/base")
    if found_by == "pre-pass":
        assert main(["coefficients", write_yaml(recipe, str(tmp_path / "r.yml"))]) == 1
        assert re.search(named, capsys.readouterr().err)
    else:
        monkeypatch.setattr(prepass, "refuse_not_floating", lambda *args: None)
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match=named):
        run_recipe(recipe, out, merge_options)
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]


def _qwen2_5_vl(path, vocab, seed, scale=0.0, base=None):
    """A tiny Qwen2.5-VL (transformers 5 keeps its vocab_size in text_config) with a word-level
    tokenizer of `vocab` tokens: `base` + noise of `scale`, its rows past the base's new."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from mergekit_metagpt.synthetic import write_tokenizer

    config = Qwen2_5_VLConfig(
        text_config=dict(SMALL, vocab_size=vocab, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         tie_word_embeddings=False),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=2, spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0]),
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items() if base is not None else ():
            rows = base[name].shape[0]
            tensor[:rows].copy_(base[name] + scale * torch.randn_like(base[name]))
    model.save_pretrained(path)
    write_tokenizer(path, vocab)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_grown_vocabulary_of_a_multimodal_config_is_written_where_transformers_reads_it(tmp_path, caplog):
    """tokenizer_source union over a Qwen2.5-VL whose fine-tune grew the vocabulary (64 -> 66):
    mergekit 0.1.5 writes 66 to the top-level vocab_size its architecture file names, while
    transformers 5 reads text_config.vocab_size, left at 64, and re-initialises the merged
    embeddings as mismatched. A MetaGPT merge sets it to the merged rows, says so, and the
    model loads with the merged embeddings; stock task_arithmetic's config is mergekit's."""
    import glob
    import logging

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from merging import run_recipe

    base = _qwen2_5_vl(str(tmp_path / "base"), 64, 0)
    with open(tmp_path / "base" / "config.json") as f:
        base_config = json.load(f)
    base_config["vision_config"]["vocab_size"] = 8192  # a tower's own (a codebook's): not the text's
    with open(tmp_path / "base" / "config.json", "w") as f:
        json.dump(base_config, f)
    _qwen2_5_vl(str(tmp_path / "a"), 66, 1, 0.01, base)
    _qwen2_5_vl(str(tmp_path / "c"), 64, 2, 0.03, base)
    paths = {name: str(tmp_path / name) for name in ("base", "a", "c")}
    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "tokenizer_source": "union", "models": [{"model": paths["a"]}, {"model": paths["c"]}]}
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, quiet=True)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    out = str(tmp_path / "out[1]")  # no glob pattern: the files mergekit wrote, not what else is there
    os.makedirs(out)
    with open(os.path.join(out, "notes.safetensors"), "w") as f:
        f.write("not a checkpoint")
    run_recipe(config, out, options)
    merged = load_file(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert (written["vocab_size"], written["text_config"]["vocab_size"]) == (66, 66)
    assert written["vision_config"]["vocab_size"] == 8192
    assert "config.json had text_config.vocab_size 64, where its token embeddings have 66 rows" in caplog.text
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(model.get_input_embeddings().weight, merged["model.embed_tokens.weight"])
    assert torch.equal(model.get_output_embeddings().weight, merged["lm_head.weight"])
    stock = str(tmp_path / "stock")
    run_recipe(dict(config, merge_method="task_arithmetic",
                    models=[dict(m, parameters={"weight": 0.5}) for m in config["models"]]), stock, options)
    with open(os.path.join(stock, "config.json")) as f:
        written = json.load(f)
    assert (written["vocab_size"], written["text_config"]["vocab_size"]) == (66, 64)
    assert {k: v.shape for f in glob.glob(os.path.join(stock, "*.safetensors")) for k, v in load_file(f).items()
            if "embed_tokens" in k} == {"model.embed_tokens.weight": (66, 32)}
    # a .bin output, whose rows are not read from headers: not mended, but said
    caplog.clear()
    pickled = str(tmp_path / "pickled")
    run_recipe(config, pickled, MergeOptions(copy_tokenizer=False, quiet=True, safe_serialization=False))
    assert ("config.json has vocabulary sizes that differ (vocab_size 66, text_config.vocab_size 64; its token "
            "embeddings' rows: not read (not a safetensors output))") in caplog.text, caplog.text
