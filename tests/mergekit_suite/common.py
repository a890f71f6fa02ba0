"""Helpers mergekit's own tests import from ``tests/common.py``, which its 0.1.5 sdist lacks.

Copied into the unpacked sdist by ``run.sh``; not collected by this project's tests.
"""

import os
import tempfile
from typing import Callable, Optional

from safetensors import safe_open
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
):
    """Merge into a temporary folder, check the output is complete and finite, then validate."""
    index_json_name = index_json_name or "model.safetensors.index.json"
    with tempfile.TemporaryDirectory() as tmpdir:
        run_merge(config, out_path=tmpdir, options=MergeOptions(copy_tokenizer=True))
        index_path = os.path.join(tmpdir, index_json_name)
        single = index_path.replace(".index.json", "")
        assert os.path.exists(index_path) or os.path.exists(single), "No model produced by merge"

        index = ShardedTensorIndex.from_disk(tmpdir)
        if check_nan:
            loader = LazyTensorLoader(index, lazy_unpickle=False)
            for name in index.tensor_paths:
                tensor = loader.get_tensor(name)
                if tensor.is_floating_point():
                    assert not tensor.isnan().any(), f"NaN in output tensor {name}"

        if check_tensors:
            model_config = AutoConfig.from_pretrained(tmpdir)
            if auto_arch:
                arch_info = get_architecture_info(config, MergeOptions())
            else:
                arch_info = arch_info_for_config(model_config)
            assert arch_info is not None, "no architecture info for the merged model"
            for weight in arch_info.all_weights(model_config):
                if weight.optional:
                    continue
                names = [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]
                assert any(n in index.tensor_paths for n in names), f"Output missing tensor {weight.name}"

        if validate:
            validate(tmpdir)


PICO = dict(hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)


def _save_pico(config_cls, model_cls, path, vocab_size: int) -> str:
    model_cls(config_cls(vocab_size=vocab_size, **PICO)).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picollama(path, vocab_size: int = 64):
    return _save_pico(LlamaConfig, LlamaForCausalLM, path, vocab_size)


def make_gpt2size(path):
    config = GPT2Config(n_embd=32, n_layer=12, n_head=4, vocab_size=64, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picogranite(path, vocab_size: int = 64):
    return _save_pico(GraniteConfig, GraniteForCausalLM, path, vocab_size)


def make_picoLlaVa(path):
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32,
    )
    text = LlamaConfig(vocab_size=64, **PICO)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=1)
    LlavaForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return str(path)
