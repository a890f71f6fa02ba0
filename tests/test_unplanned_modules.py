"""A module mergekit plans nothing of is named in a warning (MetaGPT recipes).

mergekit 0.1.5 leaves out an optional weight that no input holds under the names its
architecture gives it, with no message. Where it infers the architecture of a LLaVA
checkpoint (no JSON definition), every weight of the language model is optional under
names the checkpoint does not use, so the whole language model goes, with exit 0, for
every method. A skipped weight beside planned ones (a tied lm_head) is ordinary.
"""

from __future__ import annotations

import logging

import pytest
import torch

from checkpoints import LLAMA, llama_config, load_checkpoint
from merging import recipe, run_recipe

WARNING = "mergekit plans none of the"


def _noisy(model, scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # deduplicated: tied weights stay tied
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def _family(root, make):
    paths = {}
    for name, seed, scale in (("base", 0, 0.0), ("a", 1, 0.01), ("b", 2, 0.03)):
        torch.manual_seed(0)
        model = _noisy(make(), scale, seed)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name], safe_serialization=True)
    return paths


@pytest.fixture(scope="module")
def llava_family(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    def make():
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
        text = llama_config()
        return LlavaForConditionalGeneration(LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=LLAMA["vocab_size"] - 1,
            vision_feature_layer=-2, tie_word_embeddings=False))

    return _family(tmp_path_factory.mktemp("llava"), make)


@pytest.fixture(scope="module")
def tied_llama_family(tmp_path_factory):
    from transformers import LlamaForCausalLM

    return _family(tmp_path_factory.mktemp("tied"), lambda: LlamaForCausalLM(llama_config(tie_word_embeddings=True)))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "mergekit_metagpt" and WARNING in r.getMessage()]


def test_a_module_mergekit_plans_nothing_of_is_named(llava_family, merge_options, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    merged = run_recipe(recipe(llava_family, ["a", "b"]), str(tmp_path / "out"), merge_options)
    (message,) = _warnings(caplog)
    assert "of the 18 weights of module model.language_model.layers" in message, message
    assert "'model.language_model.layers.0." in message and "The merged model lacks them" in message
    # the warning says what happened: the output has no language-model layer at all
    assert not any(".layers." in name and "vision" not in name for name in merged)
    assert any("language_model" in name for name in load_checkpoint(llava_family["base"]))


def test_stock_methods_are_left_to_mergekit(llava_family, merge_options, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    stock = recipe(llava_family, ["a", "b"], method="task_arithmetic")
    stock["models"] = [dict(entry, parameters={"weight": 0.5}) for entry in stock["models"]]
    merged = run_recipe(stock, str(tmp_path / "out"), merge_options)
    assert not any(".layers." in name and "vision" not in name for name in merged)  # the same loss
    assert not _warnings(caplog)


def test_a_skipped_tied_lm_head_beside_planned_weights_is_not_warned_of(tied_llama_family, merge_options,
                                                                       tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    merged = run_recipe(recipe(tied_llama_family, ["a", "b"]), str(tmp_path / "out"), merge_options)
    assert "lm_head.weight" not in merged  # mergekit skipped it (tied to the embeddings)
    assert "model.embed_tokens.weight" in merged
    assert not _warnings(caplog)


def _fake_plan_module(plan_tensor_parameter="weight"):
    """A stand-in for ``mergekit.plan``: module "outer" skips one weight, plans module
    "inner" from inside its own planning (whose one weight is skipped), then plans one."""
    import types

    namespace = {}
    exec(f"""
class MergePlanner:
    def __init__(self):
        self.config = type("Config", (), {{"merge_method": "metagpt"}})()
        self._tensors = []

    def plan_tensor(self, {plan_tensor_parameter}, present=True):
        if present:
            self._tensors.append({plan_tensor_parameter})

    def plan_module(self, module_name, definition=None):
        if module_name == "outer":
            self.plan_tensor({plan_tensor_parameter}="outer.a", present=False)
            self.plan_module("inner")
            self.plan_tensor({plan_tensor_parameter}="outer.b")
        else:
            self.plan_tensor({plan_tensor_parameter}="inner.a", present=False)
""", namespace)
    return types.SimpleNamespace(__name__="fake.plan", MergePlanner=namespace["MergePlanner"])


def test_the_planner_wrapper_keeps_each_modules_count_when_planning_nests(caplog):
    from mergekit_metagpt import integration

    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    fake = _fake_plan_module()
    integration._attach_plan(fake)
    planner = fake.MergePlanner()
    planner.plan_module("outer")
    assert planner._tensors == ["outer.b"]
    (message,) = _warnings(caplog)  # outer planned outer.b after inner's planning: no warning
    assert "of the 1 weights of module inner (e.g. 'inner.a')" in message


def test_a_planner_whose_parameters_are_named_otherwise_is_left_unwrapped():
    """Renamed parameters (a later mergekit) leave the planner as it is, so that merges
    run as without the wrapper, rather than failing on the wrapper's keywords."""
    from mergekit_metagpt import integration

    fake = _fake_plan_module("weight_info")
    original = fake.MergePlanner.plan_tensor, fake.MergePlanner.plan_module
    with pytest.raises(AttributeError, match="plan_tensor has no parameter 'weight'"):
        integration._attach_plan(fake)
    assert (fake.MergePlanner.plan_tensor, fake.MergePlanner.plan_module) == original
    planner = fake.MergePlanner()
    planner.plan_module("outer")
    assert planner._tensors == ["outer.b"]
