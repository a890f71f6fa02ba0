"""Tiny LLaMA checkpoints for tests: a base plus fine-tune-like noise of distinct scales."""

from __future__ import annotations

import glob
import os
from typing import Dict, Iterable, Optional

import torch
from safetensors.torch import load_file

LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA, **overrides})


def random_state_dict(seed: int = 0, dtype=torch.float32, **overrides) -> Dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else p.data.uniform_(0.9, 1.1)
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def perturbed(base: Dict[str, torch.Tensor], scale: float, seed: int) -> Dict[str, torch.Tensor]:
    """base + N(0, scale²) noise on every floating tensor (a fake fine-tune)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * scale
        out[name] = (tensor.float() + noise).to(tensor.dtype)
    return out


def save_checkpoint(
    path: str,
    state_dict: Dict[str, torch.Tensor],
    shard_size: Optional[str] = "24KB",
    dtype=None,
    **config_overrides,
) -> str:
    """Write a loadable HF LLaMA checkpoint, sharded into several safetensors files."""
    from transformers import LlamaForCausalLM

    config = llama_config(**config_overrides)
    dtype = dtype or next(iter(state_dict.values())).dtype
    model = LlamaForCausalLM(config).to(dtype)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    # a tensor left out would be written with the model's random initialisation (its values
    # then depend on what ran before); only a tied lm_head may be, being the embedding
    tied = config.tie_word_embeddings and "model.embed_tokens.weight" in state_dict
    assert not [k for k in missing if not (tied and k == "lm_head.weight")], missing
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def load_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    out = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(file))
    return out


def shard_count(path: str) -> int:
    return len(glob.glob(os.path.join(path, "*.safetensors")))


def closed_form(base: Dict[str, torch.Tensor], models: Iterable[Dict[str, torch.Tensor]], scale: float = 1.0,
                alpha: float = 1.0):
    """Independent MetaGPT reference in float64: (λ list, merged state dict); with `alpha`,
    λ_t ∝ (‖δ_t‖²)^alpha."""
    models = list(models)
    norms = []
    for sd in models:
        norms.append(sum(
            float(((sd[k].double() - base[k].double()) ** 2).sum())
            for k in base if base[k].is_floating_point() and k in sd and sd[k].shape == base[k].shape
        ))
    powers = [n ** alpha for n in norms]
    total = sum(powers)
    lams = [n / total if total else 0.0 for n in powers]
    merged = {}
    for k, b in base.items():
        acc = b.double().clone()
        for lam, sd in zip(lams, models):
            acc += scale * lam * (sd[k].double() - b.double())
        merged[k] = acc
    return lams, merged


def write_recipe(path: str, base: str, models, method: str = "metagpt", extra: str = "", dtype: str = "float32") -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", f"dtype: {dtype}", "models:"]
    for m in models:
        lines.append(f"  - model: {m}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)
    return path


def save_raw(path: str, state_dict: Dict[str, torch.Tensor], like: str) -> str:
    """One safetensors file with exactly these tensors, and the config of `like`."""
    import shutil

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(like, "config.json"), os.path.join(path, "config.json"))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(path, "model.safetensors"))
    return path


def save_bin(path: str, state_dict: Dict[str, torch.Tensor], like: str, shards: int = 2) -> str:
    """A ``torch.save`` (.bin) checkpoint of `shards` files with their index (one file,
    ``pytorch_model.bin``, for a single shard), and the config of `like`."""
    import json
    import shutil

    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(like, "config.json"), os.path.join(path, "config.json"))
    names = sorted(state_dict)
    if shards == 1:
        torch.save(dict(state_dict), os.path.join(path, "pytorch_model.bin"))
        return path
    weight_map = {}
    for index in range(shards):
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = names[index::shards]
        torch.save({name: state_dict[name] for name in part}, os.path.join(path, file))
        weight_map.update({name: file for name in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    return path


def damage_pickle(path: str) -> str:
    """Cut the pickle inside a torch.save archive in half, the archive still a valid zip."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        items = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in items:
            archive.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)
    return path

