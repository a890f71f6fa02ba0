"""Write LLaMA-shaped checkpoint families locally: a base plus fine-tune-like variants.

Each variant is base + Gaussian noise of its own scale, so MetaGPT's coefficients
differ clearly between models. Tensors are generated and written one shard at a
time, so a 1B-parameter family needs memory for a shard, not for a model.
Used by the README's example and by ``benchmarks/``; nothing is downloaded.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int = 4
    kv_heads: int = 2

    def tensors(self) -> Iterator[Tuple[str, Tuple[int, ...]]]:
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (self.intermediate, h)
            yield p + "mlp.up_proj.weight", (self.intermediate, h)
            yield p + "mlp.down_proj.weight", (h, self.intermediate)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    @property
    def parameters(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


SIZES: Dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=64, layers=2, intermediate=128, vocab=256),
    "10m": LlamaShape(hidden=256, layers=4, intermediate=688, vocab=8000),
    "100m": LlamaShape(hidden=768, layers=8, intermediate=2048, vocab=32000, heads=12, kv_heads=4),
    "1b": LlamaShape(hidden=2048, layers=16, intermediate=5504, vocab=32000, heads=16, kv_heads=8),
}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


#: A file in each folder `write_family` writes: the folders `demo-models` may overwrite.
MARKER = ".mergekit-metagpt-demo"

#: The checkpoint folders of the demo family, base first.
NAMES = ("base", "math", "code", "chat")


def refuse_foreign_folders(root: str, names: Sequence[str] = NAMES) -> None:
    """Refuse to write the demo family where a folder it would write already holds files
    of something else (a real checkpoint: its config and weights would be overwritten)."""
    from mergekit_metagpt.errors import MetaGPTError

    if os.path.exists(root) and not os.path.isdir(root):
        raise MetaGPTError(f"demo-models: {root} is a file; give a folder (DIRECTORY) to write the models in")
    for name in names:
        path = os.path.join(root, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise MetaGPTError(f"demo-models: {path} exists and is not a folder")
        if os.path.isdir(path) and not _written_by_demo(path):
            held = sorted(os.listdir(path))
            shown = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
            raise MetaGPTError(
                f"demo-models: {path} already holds files demo-models did not write ({shown}); "
                f"give another DIRECTORY, or remove that folder"
            )


def _written_by_demo(path: str) -> bool:
    """Whether the folder is empty but for hidden files, marked as ours, or written by
    an earlier demo-models (before the mark): its config one of the demo configs and its
    files all of the names it writes."""
    held = [name for name in os.listdir(path) if not name.startswith(".")]
    if not held or os.path.exists(os.path.join(path, MARKER)):
        return True
    ours = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"}
    if any(name not in ours and not re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) for name in held):
        return False
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return any(config == shape.config(dtype) for shape in SIZES.values() for dtype in DTYPES)


def write_family(
    root: str,
    shape: LlamaShape,
    names: Sequence[str] = NAMES,
    scales: Sequence[float] = (0.004, 0.008, 0.002),
    dtype: str = "bfloat16",
    shard_bytes: int = 200 * 1024 * 1024,
    seed: int = 0,
    tokenizer: bool = True,
) -> List[str]:
    """Write names[0] as the base and names[1:] as variants with the given noise scales."""
    if len(scales) != len(names) - 1:
        raise ValueError("one noise scale per non-base model")
    torch_dtype = DTYPES[dtype]
    paths = [os.path.join(root, name) for name in names]
    for path in paths:
        os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(path, MARKER)):  # ours: a larger size's shards go
            for old in glob.glob(os.path.join(path, "model-*-of-*.safetensors")):
                os.remove(old)
        with open(os.path.join(path, MARKER), "w") as f:
            f.write("written by mergekit-metagpt demo-models; it may overwrite this folder\n")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(shape.config(dtype), f, indent=2)
        if tokenizer:
            write_tokenizer(path, shape.vocab)
    gen = torch.Generator().manual_seed(seed)
    shards: List[List[Tuple[str, List[torch.Tensor]]]] = [[]]
    shard_size = 0
    for name, dims in shape.tensors():
        if len(dims) == 1:
            base = 1.0 + 0.05 * torch.randn(dims, generator=gen)
        else:
            base = torch.randn(dims, generator=gen) * 0.02
        tensors = [base] + [base + torch.randn(dims, generator=gen) * s for s in scales]
        nbytes = base.numel() * torch_dtype.itemsize
        if shard_size and shard_size + nbytes > shard_bytes:
            _flush(paths, shards[-1], len(shards))
            shards.append([])
            shard_size = 0
        shards[-1].append((name, [t.to(torch_dtype) for t in tensors]))
        shard_size += nbytes
    _flush(paths, shards[-1], len(shards))
    _write_indexes(paths, len(shards), shape, torch_dtype)
    return paths


def _flush(paths, shard, number) -> None:
    for i, path in enumerate(paths):
        data = {name: tensors[i].contiguous() for name, tensors in shard}
        save_file(data, os.path.join(path, f"shard-{number:05d}.safetensors"), metadata={"format": "pt"})
    shard.clear()


def _write_indexes(paths, count, shape: LlamaShape, dtype) -> None:
    from safetensors import safe_open

    for path in paths:
        weight_map = {}
        for number in range(1, count + 1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(path, f"shard-{number:05d}.safetensors"), os.path.join(path, final))
            with safe_open(os.path.join(path, final), "pt") as f:
                for key in f.keys():
                    weight_map[key] = final
        total = shape.parameters * dtype.itemsize
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer with `vocab_size` tokens, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)
