"""Differential tests: merges through mergekit's ``run_merge`` against an independent float64
closed form, tensor by tensor and λ by λ.

A fixed subset, each case written out, of the cases of a randomised differential harness
(560 random recipes, none in disagreement; the harness is not kept in this repository). The closed
form imports nothing of ``mergekit_metagpt``: it reads the checkpoints' safetensors, re-derives
mergekit 0.1.5's plan of the recipe (which tensor of which model feeds each output tensor; the
embedding from the first slice's models, ``model.norm`` and ``lm_head`` from the last slice's;
a tied model's ``lm_head`` is its embedding), casts to the recipe's ``dtype`` as mergekit does,
and computes in float64, per model set (base, fine-tunes):

    ‖δ_t‖² = Σ over the set's tensors (θ_t − θ₀)²,   λ_t = (‖δ_t‖²)^α / Σ_k (‖δ_k‖²)^α
    merged = θ₀ + lambda · Σ_t λ_t (θ_t − θ₀)        (TIES: only the δ agreeing with the
                                                       sign of Σ_t λ_t δ_t)

``granularity: per_tensor`` takes the norms of the tensor alone. For vocabulary cases the
embedding / ``lm_head`` rows are first aligned by token (mergekit's rules for tokens a model
lacks: the row of the one model that has it, else the base's, else the average of those that
have it; pad rows the mean of the aligned rows).

Each merged tensor must be the closed form rounded as mergekit rounds it (compute dtype, then
``out_dtype``), within one unit in the last place of the coarser of the two, or float32
round-off of the terms summed where that is larger. Not compared: elements whose TIES sign
Σ_t λ_t δ_t is within round-off of 0 (none in these cases). DARE (``rescale: false``): each
element must be θ₀ plus the λ-weighted δ of some subset of the models, and some element must
have dropped one. The record (``metagpt_coefficients.json``) must hold the closed form's model
sets, and their ‖δ‖² and λ within 1e-6 relative.

Checkpoints: a random tiny LLaMA base and fine-tunes made of base + Gaussian noise, a
different scale per model and a per-tensor factor (so that λ over one tensor differs from
λ over the model, and a pre-pass reading too many or too few tensors shows).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from checkpoints import load_checkpoint, random_state_dict, save_checkpoint
from merging import run_recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMB, LM, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
VOCAB_TENSORS = (EMB, LM)
LAYER = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
         "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
         "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight")
#: per (model, tensor) noise factors, drawn with the model's seed
FACTORS = (0.5, 1.0, 2.0, 4.0)
HIDDEN, VOCAB = 16, 32


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Ckpt:
    """One checkpoint: base + N(0, scale²) noise (times a per-tensor factor); scale 0: the
    base's weights (in this checkpoint's dtype)."""

    scale: float
    dtype: str = "float32"
    tied: bool = False
    shard: Optional[str] = None  # max_shard_size; None: one file
    extra: Tuple[str, ...] = ()  # tokens after the base's (vocabulary cases)
    permuted: bool = False  # the base's tokens under other ids (vocabulary cases)


@dataclasses.dataclass
class Case:
    ckpts: Dict[str, Ckpt]  # "base" and the fine-tunes
    seed: int
    layers: int = 2
    models: Optional[List[str]] = None  # `models:` form, in recipe order ("base" may be listed)
    slices: Optional[List[List[Tuple[str, int, int]]]] = None  # `slices:`: (model, start, end)
    method: str = "metagpt"
    params: Dict = dataclasses.field(default_factory=dict)
    slice_params: Optional[List[Dict]] = None
    slice_bases: Optional[List[str]] = None  # per-slice base_model (then no top-level one)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer: Optional[Dict] = None  # {"source": "base"|"union"|name, "pad": multiple or None}

    @property
    def vocab(self) -> bool:
        return self.tokenizer is not None


def _fts(*scales, **common):
    return {f"m{i + 1}": Ckpt(s, **common) for i, s in enumerate(scales)}


CASES = [
    pytest.param(Case(
        {"base": Ckpt(0, shard="8KB"), **_fts(0.01, 0.03, 0.1, shard="8KB")}, seed=1, layers=3,
        models=["m2", "base", "m1", "m3"]),
        id="models-3ft-base-listed-f32-sharded"),
    pytest.param(Case(
        {"base": Ckpt(0, "bfloat16", tied=True),
         "m1": Ckpt(0.02, "bfloat16", tied=True, shard="6KB"), "m2": Ckpt(0.006, "bfloat16", tied=True)},
        seed=2, layers=3, models=["m1", "m2"]),
        id="models-all-tied-bf16-storage"),
    pytest.param(Case(
        {"base": Ckpt(0, tied=True), "m1": Ckpt(0.01), "m2": Ckpt(0.03, tied=True, shard="8KB"),
         "m3": Ckpt(0.02, tied=True)},
        seed=3, models=["m1", "m2", "m3"]),
        id="models-mixed-tied-base-tied-f32"),
    pytest.param(Case(
        {"base": Ckpt(0, "float16"), "m1": Ckpt(0.02, "bfloat16"), "m2": Ckpt(0.05, "float16", shard="8KB")},
        seed=4, models=["m1", "m2"]),
        id="storage-f16+bf16-promoted-to-f32"),
    pytest.param(Case(
        {"base": Ckpt(0), "m1": Ckpt(0.004), "m2": Ckpt(0.002, shard="8KB"), "m3": Ckpt(0.006)},
        seed=5, models=["m1", "m2", "m3"], dtype="bfloat16", out_dtype="float32"),
        id="dtype-bf16-cast-of-f32-storage-out-f32"),
    pytest.param(Case(
        {"base": Ckpt(0, "float16"), "m1": Ckpt(0.03, "float16", tied=True), "m2": Ckpt(0.01, "float32")},
        seed=6, models=["m1", "m2"], dtype="float16", out_dtype="bfloat16"),
        id="dtype-f16-mixed-storage-out-bf16"),
    pytest.param(Case(
        {"base": Ckpt(0), **_fts(0.01, 0.04, 0.02, shard="8KB")}, seed=7, layers=4,
        slices=[[("m1", 0, 2), ("m2", 0, 2), ("base", 0, 2)], [("base", 2, 4), ("m2", 2, 4), ("m3", 2, 4)]],
        slice_params=[{"lambda": 0.7, "granularity": "per_tensor"}, {"lambda": 1.5}]),
        id="slices-2-sets-per-slice-lambda-granularity"),
    pytest.param(Case(
        {"base": Ckpt(0), **_fts(0.02, 0.05)}, seed=8, layers=3,
        slices=[[("m1", 0, 2), ("base", 1, 3), ("m2", 1, 3)], [("base", 2, 3)], [("m2", 0, 1), ("base", 0, 1)]],
        params={"granularity": "per_tensor"}),
        id="slices-shifted-ranges-base-alone-per_tensor"),
    pytest.param(Case(
        {"base": Ckpt(0), "m1": Ckpt(0.01), "m2": Ckpt(0), "m3": Ckpt(0.05)}, seed=9,
        models=["m1", "m2", "m3"], params={"alpha": 0}),
        id="alpha0-average-with-ft-equal-to-base"),
    pytest.param(Case(
        {"base": Ckpt(0, "bfloat16"), **_fts(0.01, 0.03, 0.08, dtype="bfloat16")}, seed=10,
        models=["m3", "m1", "m2"], params={"alpha": 0.5, "lambda": 1.5}, dtype="bfloat16"),
        id="alpha0.5-lambda1.5-bf16"),
    pytest.param(Case(  # sets (base; m1, m2), (m3; m1, m2): one set of models, two bases; (m1; base, m3)
        {"base": Ckpt(0), **_fts(0.02, 0.01, 0.04)}, seed=11, layers=3,
        slices=[[("base", 0, 1), ("m1", 0, 1), ("m2", 0, 1)], [("m3", 1, 2), ("m1", 1, 2), ("m2", 1, 2)],
                [("m1", 2, 3), ("base", 2, 3), ("m3", 2, 3)]],
        slice_bases=["base", "m3", "m1"]),
        id="slices-per-slice-base_model-fts-as-bases"),
    pytest.param(Case(
        {"base": Ckpt(0), **_fts(0.01, 0.03, 0.06, shard="8KB")}, seed=12, models=["m1", "m2", "m3"],
        method="metagpt_ties", params={"density": 1.0}),
        id="metagpt_ties-3ft-f32"),
    pytest.param(Case(
        {"base": Ckpt(0), **_fts(0.02, 0.05)}, seed=13, models=["m1", "m2"],
        method="metagpt_dare", params={"density": 0.5, "rescale": False, "lambda": 0.7}),
        id="metagpt_dare-density0.5-no-rescale-lambda0.7"),
    pytest.param(Case(
        {"base": Ckpt(0), **_fts(0.01, 0.02, 0.04)}, seed=14, layers=4,
        slices=[[("m1", 0, 4), ("m2", 0, 4), ("m3", 0, 4), ("base", 0, 4)]],
        method="metagpt_dare_ties", params={"density": 1.0, "granularity": "per_tensor", "lambda": 0.7}),
        id="metagpt_dare_ties-per_tensor-slices"),
    pytest.param(Case(
        {"base": Ckpt(0), "m1": Ckpt(0.02, extra=("x0", "x1")), "m2": Ckpt(0.04, extra=("x1", "x2"), permuted=True),
         "m3": Ckpt(0.01, shard="8KB")},
        seed=15, models=["m1", "m2", "m3"], tokenizer={"source": "union"}),
        id="vocab-union-extended-permuted"),
    pytest.param(Case(
        {"base": Ckpt(0, "bfloat16", tied=True), "m1": Ckpt(0.03, "bfloat16", extra=("x0",)),
         "m2": Ckpt(0.01, "bfloat16", tied=True, permuted=True)},
        seed=16, models=["m1", "m2"], tokenizer={"source": "base"}),
        id="vocab-base-tied-permuted-bf16"),
    pytest.param(Case(
        {"base": Ckpt(0), "m1": Ckpt(0.02, extra=("x0", "x1", "x2")), "m2": Ckpt(0.01, extra=("x2",))},
        seed=17, layers=3, slices=[[("base", 0, 3), ("m1", 0, 3), ("m2", 0, 3)]],
        tokenizer={"source": "union", "pad": 8}),
        id="vocab-tokenizer-union-pad8-slices"),
]


# ----------------------------------------------------------------------------- checkpoints
def _words(case: Case, name: str) -> List[str]:
    """A checkpoint's tokens by id: the base's w0..w31 (w0 the unk token keeps id 0; the
    others shuffled where permuted), then its extra tokens."""
    ck = case.ckpts[name]
    words = [f"w{i}" for i in range(VOCAB)]
    if ck.permuted:
        rest = words[1:]
        random.Random(case.seed * 100 + 7).shuffle(rest)
        words = words[:1] + rest
    return words + list(ck.extra)


def _write_tokenizer(path: str, words: Sequence[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0]).save_pretrained(path)


def build(case: Case, root: str) -> Dict[str, str]:
    """Write the case's checkpoints; return {name: path}."""
    dims = dict(num_hidden_layers=case.layers, hidden_size=HIDDEN, intermediate_size=HIDDEN + 16,
                vocab_size=VOCAB)
    base = random_state_dict(case.seed, **dims)
    gen = torch.Generator().manual_seed(case.seed)
    # a row per token (the base's rows for w*, new rows for extra tokens), per vocabulary tensor
    rows = {t: {f"w{i}": base[t][i] for i in range(VOCAB)} for t in VOCAB_TENSORS}
    for t in VOCAB_TENSORS:
        for x in sorted({x for ck in case.ckpts.values() for x in ck.extra}):
            rows[t][x] = torch.randn(HIDDEN, generator=gen) * 0.05
    paths = {}
    for i, (name, ck) in enumerate(case.ckpts.items()):
        noise = torch.Generator().manual_seed(case.seed * 1000 + i)
        factor = random.Random(case.seed * 1000 + i)
        words = _words(case, name)
        sd = {}
        for key, tensor in base.items():
            if key in VOCAB_TENSORS:
                tensor = torch.stack([rows[key][w] for w in words])
            sd[key] = tensor + torch.randn(tensor.shape, generator=noise) * ck.scale * factor.choice(FACTORS)
        if ck.tied:
            del sd[LM]
        sd = {k: v.to(DTYPES[ck.dtype]) for k, v in sd.items()}
        paths[name] = save_checkpoint(os.path.join(root, name), sd, shard_size=ck.shard,
                                      tie_word_embeddings=ck.tied, **{**dims, "vocab_size": len(words)})
        if case.vocab:
            _write_tokenizer(paths[name], words)
    return paths


def recipe_of(case: Case, paths: Dict[str, str]) -> dict:
    out = {"merge_method": case.method}
    if not case.slice_bases:
        out["base_model"] = paths["base"]
    for key in ("dtype", "out_dtype"):
        if getattr(case, key):
            out[key] = getattr(case, key)
    if case.params:
        out["parameters"] = dict(case.params)
    if case.tokenizer is not None:
        source = paths.get(case.tokenizer["source"], case.tokenizer["source"])
        if case.tokenizer.get("pad"):
            out["tokenizer"] = {"source": source, "pad_to_multiple_of": case.tokenizer["pad"]}
        else:
            out["tokenizer_source"] = source
    if case.models is not None:
        out["models"] = [{"model": paths[m]} for m in case.models]
        return out
    out["slices"] = []
    for i, sl in enumerate(case.slices):
        entry = {"sources": [{"model": paths[m], "layer_range": [a, b]} for m, a, b in sl]}
        if case.slice_params and case.slice_params[i]:
            entry["parameters"] = dict(case.slice_params[i])
        if case.slice_bases:
            entry["base_model"] = paths[case.slice_bases[i]]
        out["slices"].append(entry)
    return out


# ----------------------------------------------------------------------------- closed form
@dataclasses.dataclass
class Expected:
    ref: torch.Tensor  # float64 closed form
    compute: torch.dtype
    out: torch.dtype
    mag: torch.Tensor  # |θ₀| + lambda Σ|λ_t δ_t|: the scale of the float32 round-off
    certain: torch.Tensor  # elements the TIES sign election decides beyond round-off
    #: metagpt_dare with density < 1: each model's lambda λ_t δ_t (ref: all kept)
    dare: Optional[List[torch.Tensor]] = None


def plan(case: Case, sds) -> List[Tuple[str, List[Tuple[str, str]], int]]:
    """mergekit 0.1.5's plan of a LLaMA recipe: (output tensor, [(model, its tensor)], slice)."""
    if case.models is not None:
        sources = [(m, 0, case.layers) for m in dict.fromkeys(case.models)]
        if "base" not in case.models:
            sources.append(("base", 0, case.layers))
        slices = [sources]
    else:
        slices = case.slices
    out = [(EMB, [(m, EMB) for m, _, _ in slices[0]], 0)]
    layer = 0
    for index, sl in enumerate(slices):
        for offset in range(sl[0][2] - sl[0][1]):
            for w in LAYER:
                out.append((f"model.layers.{layer}.{w}", [(m, f"model.layers.{a + offset}.{w}") for m, a, _ in sl],
                            index))
            layer += 1
    last = len(slices) - 1
    # mergekit 0.1.5 takes the post-layer tensors (norm, lm_head) from the last slice's
    # sources, as many as the first slice has (no case here has a longer last slice)
    post = [m for m, _, _ in slices[last]][: len(slices[0])]
    out.append((NORM, [(m, NORM) for m in post], last))
    if any(LM in sds[m] for m in post):  # lm_head is optional: written where a model has one
        out.append((LM, [(m, LM) for m in post], last))
    return out


def output_tokens(case: Case, referenced: Sequence[str]) -> Tuple[List[str], int]:
    """The merged vocabulary (compared by token) and its number of pad rows."""
    source = case.tokenizer["source"]
    if source == "union":
        tokens = list(dict.fromkeys(t for m in ["base", *referenced] for t in _words(case, m)))
    else:
        tokens = _words(case, source)
    multiple = case.tokenizer.get("pad")
    return tokens, (-len(tokens) % multiple if multiple else 0)


def align(case: Case, raw: Dict[str, torch.Tensor], tokens: List[str], pad: int) -> Dict[str, torch.Tensor]:
    """Each model's rows in the merged vocabulary's order (mergekit's PermutedVocabulary)."""
    vocab = {m: {w: i for i, w in enumerate(_words(case, m))} for m in raw}
    dtype = None
    for t in raw.values():
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    fill = {}
    for token in tokens:
        has = [m for m in raw if token in vocab[m]]
        if len(has) == len(raw):
            continue
        if len(has) == 1:
            fill[token] = raw[has[0]][vocab[has[0]][token]]
        elif not has:
            fill[token] = torch.zeros(HIDDEN, dtype=dtype)
        elif "base" in raw and token in vocab["base"]:
            fill[token] = raw["base"][vocab["base"][token]]
        else:
            fill[token] = sum(raw[m][vocab[m][token]].to(dtype) for m in has) / len(has)
    out = {}
    for m, t in raw.items():
        new = torch.zeros(len(tokens) + pad, HIDDEN, dtype=dtype)
        for i, token in enumerate(tokens):
            new[i] = t[vocab[m][token]] if token in vocab[m] else fill[token]
        if pad:
            new[len(tokens):] = new[: len(tokens)].mean(dim=0)
        out[m] = new
    return out


def lambdas(norms: Dict[str, float], alpha: float) -> Dict[str, float]:
    if not any(norms.values()):
        return {m: 0.0 for m in norms}
    powers = {m: (v ** alpha if v or alpha else 1.0) for m, v in norms.items()}
    total = sum(powers.values())
    return {m: p / total for m, p in powers.items()}


def closed_form(case: Case, sds, tokens=None, pad=0):
    """({output tensor: Expected}, {(base, frozenset(fine-tunes)): {model: (‖δ‖², λ)}})."""
    cast = DTYPES.get(case.dtype)
    bases = case.slice_bases or ["base"] * len(case.slices or [None])
    inputs = {}
    for name, ins, index in plan(case, sds):
        sd_names = dict(ins)
        raw = {}
        for m, key in ins:
            t = sds[m][EMB] if key == LM and LM not in sds[m] else sds[m][key]  # a tied lm_head: the embedding
            raw[m] = t.to(cast) if cast is not None else t
        if tokens is not None and name in VOCAB_TENSORS:
            raw = align(case, raw, tokens, pad)
        inputs[name] = (raw, bases[index], index)
        assert bases[index] in sd_names, f"{name}: the base is not among the inputs"
    alpha = float(case.params.get("alpha", 1.0))

    def sq(a, b):
        return float(((a.double() - b.double()) ** 2).sum())

    sets: Dict[tuple, Dict[str, float]] = {}
    for name, (raw, base, _) in inputs.items():
        fts = frozenset(raw) - {base}
        if fts:
            acc = sets.setdefault((base, fts), {m: 0.0 for m in fts})
            for m in fts:
                acc[m] += sq(raw[m], raw[base])
    set_info = {key: {m: (norms[m], lam) for m, lam in lambdas(norms, alpha).items()}
                for key, norms in sets.items()}

    ties = case.method in ("metagpt_ties", "metagpt_dare_ties")
    density = float(case.params.get("density", 1.0))
    expected = {}
    for name, (raw, base, index) in inputs.items():
        params = {**case.params, **((case.slice_params or [{}] * (index + 1))[index])}
        scale = float(params.get("lambda", 1.0))
        compute = cast
        for t in raw.values():
            compute = t.dtype if compute is None else torch.promote_types(compute, t.dtype)
        b = raw[base].double()
        ref, mag = b.clone(), b.abs()
        certain = torch.ones_like(b, dtype=torch.bool)
        dare = None
        fts = [m for m in raw if m != base]
        if fts:
            if params.get("granularity", "global") == "per_tensor":
                lam = lambdas({m: sq(raw[m], raw[base]) for m in fts}, alpha)
            else:
                lam = {m: v[1] for m, v in set_info[(base, frozenset(fts))].items()}
            weighted = [lam[m] * (raw[m].double() - b) for m in fts]
            mag = mag + scale * sum(w.abs() for w in weighted)
            if ties:
                total = sum(weighted)
                certain = total.abs() > 1e-5 * sum(w.abs() for w in weighted)
                majority = torch.where(total >= 0, 1.0, -1.0).double()
                weighted = [w * (torch.sign(w) == majority) for w in weighted]
            ref = b + scale * sum(weighted)
            if density < 1:  # DARE's random drop; kept elements unchanged (rescale: false)
                assert case.params.get("rescale") is False, "the closed form knows no rescaled drop"
                # its candidates are unrounded sums: exact only where mergekit computes in float32
                assert compute == torch.float32, "the closed form knows DARE in float32 only"
                dare = [scale * w for w in weighted]
        expected[name] = Expected(ref, compute, DTYPES[case.out_dtype] if case.out_dtype else compute, mag,
                                  certain, dare)
    return expected, set_info


# ----------------------------------------------------------------------------- comparison
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    return torch.pow(2.0, torch.floor(torch.log2(x.abs().clamp(min=torch.finfo(dtype).tiny))) - mantissa)


def tensor_problem(name: str, got: torch.Tensor, exp: Expected) -> Optional[str]:
    if got.dtype != exp.out:
        return f"{name}: dtype {got.dtype}, expected {exp.out}"
    if got.shape != exp.ref.shape:
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(exp.ref.shape)}"
    g = got.double()
    # one unit in the last place of the coarser of compute and output dtype, but at least
    # float32 round-off of the terms summed (a few units of float32 at their size)
    coarse = max((exp.compute, exp.out), key=lambda d: torch.finfo(d).eps)
    tol = torch.maximum(ulp(exp.ref, coarse), 2.0 ** -21 * exp.mag)
    if exp.dare is None:
        diff = (g - exp.ref.to(exp.compute).to(exp.out).double()).abs()
    else:  # DARE drops each model's element at random: θ₀ + the sum over the kept ones
        base = exp.ref - sum(exp.dare)
        candidates = [base + sum(d for d, keep in zip(exp.dare, kept) if keep)
                      for kept in itertools.product((False, True), repeat=len(exp.dare))]
        diff = torch.stack([(g - c).abs() for c in candidates]).min(dim=0).values
        if g.ndim == 2 and not bool(((g - exp.ref).abs() > tol).any()):
            return f"{name}: nothing dropped at density < 1"
    bad = (diff > tol) & exp.certain
    if bool(bad.any()):
        return f"{name}: {int(bad.sum())}/{bad.numel()} elements off, max {float((diff / tol).max()):.3g} x tolerance"
    return None


def check_record(out: str, paths: Dict[str, str], set_info) -> List[str]:
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        record = json.load(f)
    name_of = {p: n for n, p in paths.items()}
    problems, seen = [], set()
    for entry in record["merges"]:
        listed = [name_of[r["model"]] for r in entry["models"]]
        key = (name_of[entry["base_model"]], frozenset(listed))
        if len(listed) != len(key[1]) or key not in set_info:
            problems.append(f"record set {key[0]}:{sorted(listed)} not a set of the closed form {list(set_info)}")
            continue
        seen.add(key)
        for r, m in zip(entry["models"], listed):
            norm, lam = set_info[key][m]
            if not math.isclose(r["squared_norm"], norm, rel_tol=1e-6, abs_tol=1e-12):
                problems.append(f"set {sorted(key[1])} {m}: squared_norm {r['squared_norm']!r}, closed form {norm!r}")
            if not math.isclose(r["lambda"], lam, rel_tol=1e-6, abs_tol=1e-9):
                problems.append(f"set {sorted(key[1])} {m}: lambda {r['lambda']!r}, closed form {lam!r}")
    problems += [f"closed-form set {k[0]}:{sorted(k[1])} missing from the record" for k in set_info if k not in seen]
    return problems


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize("case", CASES)
def test_merge_matches_float64_closed_form(case: Case, tmp_path):
    from mergekit.options import MergeOptions

    paths = build(case, str(tmp_path / "models"))
    sds = {name: load_checkpoint(path) for name, path in paths.items()}
    tokens, pad = None, 0
    if case.vocab:
        referenced = case.models if case.models is not None else [m for sl in case.slices for m, _, _ in sl]
        tokens, pad = output_tokens(case, [m for m in dict.fromkeys(referenced) if m != "base"])
    expected, set_info = closed_form(case, sds, tokens, pad)
    # the case means something: TIES's sign decided beyond round-off (nearly) everywhere, and
    # λ that differ from the plain average
    assert sum(int((~e.certain).sum()) for e in expected.values()) <= 10
    assert any(max(lam for _, lam in s.values()) - min(lam for _, lam in s.values()) > 0.05
               for s in set_info.values()) or case.params.get("alpha") == 0

    out = str(tmp_path / "out")
    merged = run_recipe(recipe_of(case, paths), out, MergeOptions(copy_tokenizer=False, quiet=True, random_seed=0))

    assert set(merged) == set(expected)
    if tokens is not None:  # rows by token: the output tokenizer's id of each closed-form token
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(out).get_vocab()
        assert set(ids) == set(tokens)
        order = [ids[t] for t in tokens] + list(range(len(tokens), len(tokens) + pad))
        for name in VOCAB_TENSORS:
            if name in merged:
                assert merged[name].shape[0] == len(order), name
                merged[name] = merged[name][order]
    problems = [p for name, exp in expected.items() if (p := tensor_problem(name, merged[name], exp))]
    problems += check_record(out, paths, set_info)
    assert not problems, "\n".join(problems)
