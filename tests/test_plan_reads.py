"""λ from exactly what the merge plan reads, from every entry point (issue 9).

Each test builds tiny LLaMA checkpoints (a base plus noise of its own scale per
model and per tensor group), merges them through a stock mergekit entry point, and
compares the λ and the merged weights with a closed form computed here, in float64,
from the state dicts: the norms of a merge set are summed over the tensors that set
writes to the output model, read the way mergekit reads them (slices and their layer
offsets, the first slice's set for the embeddings and the last slice's for the final
norm and lm_head, a tied base's lm_head read from its embed_tokens, the rows a
resized vocabulary shares with the base).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch
import yaml

import mergekit_metagpt  # noqa: F401
from checkpoints import load_checkpoint, random_state_dict, save_checkpoint
from merging import run_mergekit_yaml, write_yaml

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
RECORD = "metagpt_coefficients.json"
BIN = os.path.dirname(sys.executable)

StateDict = Dict[str, torch.Tensor]


# -- fixtures: a base and fine-tune-like variants ------------------------------------
def layer_of(name: str) -> Optional[int]:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def noisy(base: StateDict, scale: Callable[[str], float], seed: int) -> StateDict:
    """base + N(0, scale(name)²) noise per tensor (scale 0: the tensor is the base's)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
        s = scale(name)
        out[name] = tensor.clone() if s == 0 else (tensor.float() + noise * s).to(tensor.dtype)
    return out


def by_part(embed=0.0, layers: Sequence[float] = (0.0, 0.0), norm=0.0, head=0.0):
    """A noise scale per part of the model: embeddings, each layer, final norm, lm_head."""

    def scale(name: str) -> float:
        if name == EMBED:
            return embed
        if name == NORM:
            return norm
        if name == HEAD:
            return head
        return layers[layer_of(name)]

    return scale


def uniform(s: float):
    return lambda name: s


def layer_names(sd: StateDict, index: int) -> List[str]:
    return [n for n in sd if layer_of(n) == index]


def moved(name: str, to: int) -> str:
    return re.sub(r"^model\.layers\.\d+\.", f"model.layers.{to}.", name)


# -- the closed form -------------------------------------------------------------------
Read = Tuple[str, str]  # (output tensor name, input tensor name)


def sq(x: torch.Tensor, b: torch.Tensor) -> float:
    return float((x.double() - b.double()).pow(2).sum())


def closed_lambdas(base: StateDict, models: Dict[str, StateDict], reads: Iterable[Read],
                   base_name: Callable[[str], str] = lambda n: n,
                   rows: Optional[int] = None) -> Dict[str, float]:
    """λ of one merge set over the reads it makes (repeated reads count again).

    `base_name(input name)`: the base's tensor that a read compares with (a tied
    base's lm_head is its embed_tokens); `rows`: vocabulary rows both have.
    """
    norms = {m: 0.0 for m in models}
    for _, name in reads:
        b = base[base_name(name)]
        for m, sd in models.items():
            x = sd[name]
            if x.shape != b.shape:
                assert rows is not None and x.shape[1:] == b.shape[1:], name
                x, b_ = x[:rows], b[:rows]
            else:
                b_ = b
            norms[m] += sq(x, b_)
    total = sum(norms.values())
    return {m: (v / total if total else 0.0) for m, v in norms.items()}


def closed_merge(base: StateDict, models: Dict[str, StateDict], lams: Dict[str, float],
                 reads: Iterable[Read], scale: float = 1.0) -> Dict[str, torch.Tensor]:
    out = {}
    for out_name, name in reads:
        acc = base[name].double().clone()
        for m, sd in models.items():
            acc += scale * lams[m] * (sd[name].double() - base[name].double())
        out[out_name] = acc
    return out


def assert_close(merged: StateDict, reference: Dict[str, torch.Tensor], atol=1e-5):
    for name, ref in reference.items():
        err = (merged[name].double() - ref).abs().max().item()
        assert err < atol, f"{name}: max error {err}"


def assert_lambdas(got: Dict[str, float], want: Dict[str, float], tol=1e-6):
    assert set(got) == set(want), (got, want)
    for m in want:
        assert abs(got[m] - want[m]) < tol, (m, got, want)


# -- running merges ---------------------------------------------------------------------
def record_sets(out: str, names: Dict[str, str]) -> List[Dict[str, float]]:
    """Each merge set of the record as {model name: λ} (names: path -> name)."""
    with open(os.path.join(out, RECORD)) as f:
        record = json.load(f)
    return [{names[row["model"]]: row["lambda"] for row in entry["models"]} for entry in record["merges"]]


def mergekit_yaml(config: dict, tmp_path, name: str, *flags: str) -> str:
    """Stock mergekit-yaml in a fresh process; the output folder."""
    path = write_yaml(config, str(tmp_path / f"{name}.yml"))
    out = str(tmp_path / name)
    result = run_mergekit_yaml(path, out, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def source(path: str, start: int, end: int) -> dict:
    return {"model": path, "layer_range": [start, end]}


def slice_recipe(base: str, slices: List[List[dict]], method="metagpt", **extra) -> dict:
    out = {
        "merge_method": method,
        "base_model": base,
        "dtype": "float32",
        "slices": [{"sources": s} for s in slices],
    }
    out.update(extra)
    return out


# =====================================================================================
# 1. slices
# =====================================================================================
@pytest.fixture(scope="module")
def slice_family(tmp_path_factory):
    return make_slice_family(tmp_path_factory.mktemp("slices"))


def make_slice_family(root):
    """base; a: noise everywhere; b: most noise in layer 1; c: most in the embeddings;
    d: equal to the base except layer 1."""
    base = random_state_dict(11)
    sds = {
        "base": base,
        "a": noisy(base, uniform(0.02), 1),
        "b": noisy(base, by_part(embed=0.01, layers=(0.01, 0.08), norm=0.01, head=0.01), 2),
        "c": noisy(base, by_part(embed=0.1, layers=(0.02, 0.01), norm=0.02, head=0.005), 3),
        "d": noisy(base, by_part(layers=(0.0, 0.1)), 4),
    }
    paths = {name: save_checkpoint(str(root / name), sd) for name, sd in sds.items()}
    return paths, sds


def _names(paths):
    return {p: n for n, p in paths.items()}


def test_slice_subset_counts_only_the_kept_layers(slice_family, tmp_path):
    """One slice keeping layer 0 of base, a, b and d: λ from embed_tokens, layer 0,
    norm and lm_head, never from layer 1, which the output does not hold (d, which
    changed only layer 1, gets λ = 0)."""
    paths, sds = slice_family
    models = ["a", "b", "d"]
    config = slice_recipe(paths["base"], [[source(paths[m], 0, 1) for m in ["base", *models]]])
    out = mergekit_yaml(config, tmp_path, "out")
    reads = [(EMBED, EMBED)] + [(n, n) for n in layer_names(sds["base"], 0)] + [(NORM, NORM), (HEAD, HEAD)]
    group = {m: sds[m] for m in models}
    lams = closed_lambdas(sds["base"], group, reads)
    assert lams["d"] == 0.0
    merged = load_checkpoint(out)
    assert set(merged) == {o for o, _ in reads}
    assert_close(merged, closed_merge(sds["base"], group, lams, reads))
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)


def test_frankenmerge_overlap_counts_a_layer_merged_twice_twice(slice_family, tmp_path):
    """Slices [0, 2) and [1, 2) over one model set: the output has layers 0, 1, 1 of
    the inputs, and layer 1's task vectors count twice (norms in output coordinates)."""
    paths, sds = slice_family
    models = ["a", "b"]
    config = slice_recipe(paths["base"], [
        [source(paths[m], 0, 2) for m in ["base", *models]],
        [source(paths[m], 1, 2) for m in ["base", *models]],
    ])
    out = mergekit_yaml(config, tmp_path, "out")
    base = sds["base"]
    reads = (
        [(EMBED, EMBED)]
        + [(n, n) for n in layer_names(base, 0)]
        + [(n, n) for n in layer_names(base, 1)]
        + [(moved(n, 2), n) for n in layer_names(base, 1)]
        + [(NORM, NORM), (HEAD, HEAD)]
    )
    group = {m: sds[m] for m in models}
    lams = closed_lambdas(base, group, reads)
    once = closed_lambdas(base, group, [(n, n) for n in base])
    assert abs(lams["b"] - once["b"]) > 0.02  # the fixture tells the two apart
    merged = load_checkpoint(out)
    assert set(merged) == {o for o, _ in reads}
    assert_close(merged, closed_merge(base, group, lams, reads))
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)


def test_a_layer_merged_twice_is_read_once(slice_family, tmp_path, monkeypatch):
    """The pre-pass counts layer 1 twice but reads it (base and models) once."""
    from mergekit.options import MergeOptions

    from merging import run_recipe
    from mergekit_metagpt import prepass

    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    paths, sds = slice_family
    config = slice_recipe(paths["base"], [
        [source(paths[m], 0, 2) for m in ["base", "a", "b"]],
        [source(paths[m], 1, 2) for m in ["base", "a", "b"]],
    ])
    read = prepass.STATS.tensors_read
    run_recipe(config, str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, quiet=True))
    assert prepass.STATS.tensors_read - read == 3 * len(sds["base"])


def test_each_slice_model_set_gets_its_own_lambdas(slice_family, tmp_path):
    """Slice 1: base, a, b, layer 0; slice 2: base, b, c, layer 1. Set {a, b} merges
    embed_tokens and layer 0, set {b, c} layer 1, norm and lm_head; each set's λ come
    from its own tensors, and each output tensor is merged with its set's λ."""
    paths, sds = slice_family
    config = slice_recipe(paths["base"], [
        [source(paths[m], 0, 1) for m in ["base", "a", "b"]],
        [source(paths[m], 1, 2) for m in ["base", "b", "c"]],
    ])
    out = mergekit_yaml(config, tmp_path, "out")
    base = sds["base"]
    first = [(EMBED, EMBED)] + [(n, n) for n in layer_names(base, 0)]
    second = [(moved(n, 1), n) for n in layer_names(base, 1)] + [(NORM, NORM), (HEAD, HEAD)]
    set1, set2 = {m: sds[m] for m in "ab"}, {m: sds[m] for m in "bc"}
    lams1, lams2 = closed_lambdas(base, set1, first), closed_lambdas(base, set2, second)
    merged = load_checkpoint(out)
    assert set(merged) == {o for o, _ in first + second}
    # layer by layer, each with its own set's λ
    assert_close(merged, closed_merge(base, set1, lams1, first))
    assert_close(merged, closed_merge(base, set2, lams2, second))
    got = record_sets(out, _names(paths))
    assert len(got) == 2
    assert_lambdas(next(g for g in got if "a" in g), lams1)
    assert_lambdas(next(g for g in got if "c" in g), lams2)


def test_a_last_slice_with_more_sources_than_the_first(slice_family, tmp_path):
    """Slice 1: base, a, layer 0; slice 2: base, b, c, layer 1. mergekit 0.1.5 plans the
    final norm and lm_head with the last slice's models but as many inputs as the first
    slice has, so it reads base and b only for them (c is named, never read): those two
    tensors are a set {b} of their own (λ_b = 1), as the merge has them; the pre-pass
    crashed on the unread model (KeyError)."""
    paths, sds = slice_family
    config = slice_recipe(paths["base"], [
        [source(paths[m], 0, 1) for m in ["base", "a"]],
        [source(paths[m], 1, 2) for m in ["base", "b", "c"]],
    ])
    path = write_yaml(config, str(tmp_path / "out.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(path, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"mergekit reads nothing of \S+/c for model\.norm\.weight, lm_head\.weight", result.stderr)
    base = sds["base"]
    first = [(EMBED, EMBED)] + [(n, n) for n in layer_names(base, 0)]
    second = [(moved(n, 1), n) for n in layer_names(base, 1)]
    last = [(NORM, NORM), (HEAD, HEAD)]
    sets = [{"a": sds["a"]}, {m: sds[m] for m in "bc"}, {"b": sds["b"]}]
    merged = load_checkpoint(out)
    assert set(merged) == {o for o, _ in first + second + last}
    want = []
    for group, reads in zip(sets, (first, second, last)):
        lams = closed_lambdas(base, group, reads)
        assert_close(merged, closed_merge(base, group, lams, reads))
        want.append(lams)
    got = record_sets(out, _names(paths))
    assert len(got) == 3
    for lams in want:
        assert_lambdas(next(g for g in got if set(g) == set(lams)), lams)


@pytest.mark.parametrize("slices, names, fix", [
    # slice 1: the base alone; slice 2 lists b before the base: by the same quirk mergekit
    # reads b only for the final norm and lm_head (a slice listing no base at all is
    # mergekit's own planning error)
    ([["base"], ["b", "base", "a"]], r"model\.norm\.weight, lm_head\.weight",
     "list the base first in the last slice"),
])
def test_a_tensor_whose_inputs_lack_the_base_is_refused_before_anything_is_written(slices, names, fix,
                                                                                   slice_family, tmp_path):
    """Stock mergekit stops at that tensor ('Base input is not present'); the plugin
    warned that it would be merged over b. Refused at planning, naming base and tensors."""
    paths, _ = slice_family
    config = slice_recipe(paths["base"], [[source(paths[m], i, i + 1) for m in models]
                                          for i, models in enumerate(slices)])
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(write_yaml(config, str(tmp_path / "r.yml")), out)
    assert result.returncode != 0
    assert re.search(r"MetaGPT: mergekit reads no tensor of the base model \S+/base for " + names,
                     result.stderr), result.stderr[-3000:]
    assert fix in result.stderr and "merged, and their λ taken" not in result.stderr
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]


def test_a_first_slice_of_the_base_alone_leaves_the_last_tensors_unmerged(slice_family, tmp_path):
    """Slice 1: the base alone; slice 2: base, a, b. By the same quirk mergekit reads only the
    base for the final norm and lm_head: they are the base's, passed through, and the
    warning says so (it said they were merged)."""
    paths, sds = slice_family
    config = slice_recipe(paths["base"], [
        [source(paths["base"], 0, 1)],
        [source(paths[m], 1, 2) for m in ["base", "a", "b"]],
    ])
    path = write_yaml(config, str(tmp_path / "out.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(path, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"reads nothing of \S+/a, \S+/b for model\.norm\.weight, lm_head\.weight, though the "
                     r"last slice lists them .*; they are the base's, passed through", result.stderr)
    base = sds["base"]
    merged = load_checkpoint(out)
    for name in (NORM, HEAD):
        assert torch.equal(merged[name], base[name]), name
    second = [(moved(n, 1), n) for n in layer_names(base, 1)]
    group = {m: sds[m] for m in "ab"}
    lams = closed_lambdas(base, group, second)
    assert_close(merged, closed_merge(base, group, lams, second))
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)
    with open(os.path.join(out, RECORD)) as f:
        (passed,) = json.load(f)["passed_through"]
    assert passed["tensors"] == 1 + len(layer_names(base, 0)) + 2  # embeddings, layer 0, norm, head


# =====================================================================================
# 2. a slice of the base alone
# =====================================================================================
def test_slice_with_only_the_base_is_passed_through(slice_family, tmp_path, capsys):
    """The base-only slice's tensors are the base's; record, log, card, `coefficients` and
    `inspect` say so, with no λ table and no all-zero warning for them."""
    from mergekit_metagpt.cli import main

    paths, sds = slice_family
    config = slice_recipe(paths["base"], [
        [source(paths[m], 0, 1) for m in ["base", "a", "b"]],
        [source(paths["base"], 1, 2)],
    ])
    recipe_path = write_yaml(config, str(tmp_path / "out.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(recipe_path, out, "-v")
    assert result.returncode == 0, result.stderr[-3000:]
    base = sds["base"]
    passed = len(layer_names(base, 1)) + 2  # layer 1, norm and lm_head
    sentence = f"{passed} tensors of the output come from the base model {paths['base']} alone"
    assert "every task vector is zero" not in result.stderr
    assert sentence in result.stderr and result.stderr.count("MetaGPT coefficients (") == 1
    with open(os.path.join(out, RECORD)) as f:
        record = json.load(f)
    assert len(record["merges"]) == 1
    assert record["passed_through"] == [{"base_model": paths["base"], "tensors": passed}]
    with open(os.path.join(out, "README.md")) as f:
        assert sentence in f.read()
    assert main(["coefficients", recipe_path]) == 0
    text = capsys.readouterr().out
    assert sentence in text and "model set" not in text
    assert main(["inspect", recipe_path, str(tmp_path / "inspect")]) == 0  # pictures of the one set
    with open(tmp_path / "inspect" / "metagpt-report.md") as f:
        assert sentence in f.read()
    merged_reads = [(EMBED, EMBED)] + [(n, n) for n in layer_names(base, 0)]
    group = {m: sds[m] for m in "ab"}
    lams = closed_lambdas(base, group, merged_reads)
    merged = load_checkpoint(out)
    assert_close(merged, closed_merge(base, group, lams, merged_reads))
    # layer 1, norm and lm_head (the last slice's set: the base alone) are the base's
    for name in layer_names(base, 1) + [NORM, HEAD]:
        assert torch.equal(merged[name], base[name]), name
    (got,) = [g for g in record_sets(out, _names(paths)) if g]
    assert_lambdas(got, lams)


def test_base_alone_slices_take_no_alpha(slice_family, tmp_path, capsys):
    """Two slices of the base alone (one set) with other alpha values than the merging
    slice: no λ uses them, so nothing is refused; the sentence counts both slices."""
    from mergekit_metagpt.cli import main

    paths, sds = slice_family
    config = slice_recipe(paths["base"], [
        [source(paths["base"], 0, 1)],
        [source(paths[m], 0, 2) for m in ["base", "a", "b"]],
        [source(paths["base"], 1, 2)],
    ])
    config["slices"][0]["parameters"] = {"alpha": 0.5}
    config["slices"][1]["parameters"] = {"alpha": 0.25}
    assert main(["coefficients", write_yaml(config, str(tmp_path / "r.yml")), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    passed = 2 * len(layer_names(sds["base"], 0)) + 3  # two layers, embeddings, norm, lm_head
    assert record["passed_through"] == [{"base_model": paths["base"], "tensors": passed}]
    (entry,) = record["merges"]
    assert entry["alpha"] == 0.25


def test_passed_through_sentence():
    from mergekit_metagpt.record import passed_through_text

    assert passed_through_text([]) == ""
    one = passed_through_text([{"base_model": "b", "tensors": 1}], ascii=True)
    assert one.startswith("1 tensor of the output comes from the base model b alone") and "lambda" in one
    two = passed_through_text([{"base_model": "b", "tensors": 10}, {"base_model": "m", "tensors": 11}])
    assert two.startswith("21 tensors of the output come from a base model alone")
    assert two.endswith("λ: 10 from b, 11 from m")


@pytest.mark.parametrize("form", ["models", "slices"])
def test_a_recipe_of_the_base_alone_is_refused(form, slice_family, tmp_path):
    paths, _ = slice_family
    if form == "models":
        config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
                  "models": [{"model": paths["base"]}]}
    else:
        config = slice_recipe(paths["base"], [[source(paths["base"], 0, 1)], [source(paths["base"], 1, 2)]])
    path = write_yaml(config, str(tmp_path / "r.yml"))
    result = run_mergekit_yaml(path, str(tmp_path / "out"))
    assert result.returncode != 0
    assert "at least one model besides the base" in result.stderr


# =====================================================================================
# 3. a resized vocabulary
# =====================================================================================
VOCAB, RESIZED = 64, 68


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    return make_vocab_family(tmp_path_factory.mktemp("vocab"))


def make_vocab_family(root):
    """base, a and b with 64 tokens; r with 68 (4 added rows), most noise in its embeddings."""
    from mergekit_metagpt.synthetic import write_tokenizer

    base = random_state_dict(21)
    sds = {
        "base": base,
        "a": noisy(base, uniform(0.02), 1),
        "b": noisy(base, by_part(embed=0.005, layers=(0.05, 0.05), norm=0.01, head=0.005), 2),
    }
    r = noisy(base, by_part(embed=0.1, layers=(0.01, 0.01), norm=0.01, head=0.08), 3)
    gen = torch.Generator().manual_seed(33)
    for name in (EMBED, HEAD):
        extra = torch.randn((RESIZED - VOCAB, r[name].shape[1]), generator=gen) * 0.05
        r[name] = torch.cat([r[name], extra]).contiguous()
    sds["r"] = r
    paths = {}
    for name, sd in sds.items():
        vocab = RESIZED if name == "r" else VOCAB
        paths[name] = save_checkpoint(str(root / name), sd, vocab_size=vocab)
        write_tokenizer(paths[name], vocab)
    return paths, sds


def _vocab_recipe(paths, tokenizer_source):
    return {
        "merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
        "tokenizer_source": tokenizer_source,
        "models": [{"model": paths[m]} for m in ("a", "r", "b")],
    }


def test_a_model_replaced_before_the_pre_pass_of_a_vocabulary_merge_caches_no_norms_of_it(
        tmp_path, merge_options, monkeypatch):
    """With a vocabulary adapter the pre-pass takes the first task's token-aligned tensors as
    mergekit read them (`given`), from the files as they were when the merge began: a model
    replaced by rename before the pre-pass must not have those norms cached under its new
    files' key. The next merge, from the cache, takes the λ a merge without the cache takes."""
    from merging import run_recipe
    from mergekit_metagpt import prepass
    from mergekit_metagpt.synthetic import write_tokenizer

    paths, sds = make_vocab_family(tmp_path / "family")
    base = sds["base"]
    new = {k: base[k] + (v - base[k]) * 3.0 for k, v in sds["a"].items()}
    real_compute, given = prepass.compute, []

    def replace_first(run, *args, **kwargs):
        if not given:
            staging = save_checkpoint(paths["a"] + ".staging", new, vocab_size=VOCAB)
            write_tokenizer(staging, VOCAB)
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(paths["a"], name))
            shutil.rmtree(staging)
            given.append(bool(kwargs.get("given")))
        return real_compute(run, *args, **kwargs)

    def lambdas(out):
        with open(os.path.join(out, "metagpt_coefficients.json")) as f:
            return [row["lambda"] for row in json.load(f)["merges"][0]["models"]]

    monkeypatch.setattr(prepass, "compute", replace_first)
    run_recipe(_vocab_recipe(paths, "base"), str(tmp_path / "replaced"), merge_options)
    assert given == [True]  # the case: aligned tensors handed over by mergekit
    monkeypatch.setattr(prepass, "compute", real_compute)
    prepass.clear_memo()
    run_recipe(_vocab_recipe(paths, "base"), str(tmp_path / "cached"), merge_options)
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    prepass.clear_memo()
    run_recipe(_vocab_recipe(paths, "base"), str(tmp_path / "uncached"), merge_options)
    assert lambdas(str(tmp_path / "cached")) == pytest.approx(lambdas(str(tmp_path / "uncached")), rel=1e-7)


@pytest.mark.parametrize("tokenizer_source", ["union", "base"])
def test_resized_vocabulary_norms_over_the_aligned_tensors_and_cached(
    tokenizer_source, vocab_family, tmp_path
):
    """r's 4 added tokens: with "base" mergekit drops their rows; with "union" every model
    (and the base) takes r's rows for them, so no task vector moves there: either way
    the norms are those of the 64 rows all share. A second run (fresh process, same
    norm cache) reads no tensor, though a union's ids for added tokens vary by process."""
    paths, sds = vocab_family
    from mergekit_metagpt import norm_cache

    base = sds["base"]
    group = {m: sds[m] for m in ("a", "r", "b")}
    reads = [(n, n) for n in base]
    lams = closed_lambdas(base, group, reads, rows=VOCAB)
    config = write_yaml(_vocab_recipe(paths, tokenizer_source), str(tmp_path / "r.yml"))
    stderrs = []
    for run in ("first", "second"):  # each in a fresh process, one norm cache
        out = str(tmp_path / run)
        result = run_mergekit_yaml(config, out, "-v")
        assert result.returncode == 0, result.stderr[-3000:]
        stderrs.append(result.stderr)
        merged = load_checkpoint(out)
        reference = closed_merge(base, group, lams, [(n, n) for n in base if n not in (EMBED, HEAD)])
        assert_close(merged, reference)
        for name in (EMBED, HEAD):  # the base's rows, merged with the same λ
            expected = base[name].double() + sum(
                lams[m] * (sd[name][:VOCAB].double() - base[name].double()) for m, sd in group.items()
            )
            assert (merged[name][:VOCAB].double() - expected).abs().max().item() < 1e-5, name
            added = sorted(merged[name][VOCAB:].tolist())  # r's own rows, in the union's order
            assert added == (sorted(sds["r"][name][VOCAB:].tolist()) if tokenizer_source == "union" else [])
        (got,) = record_sets(out, _names(paths))
        assert_lambdas(got, lams)
        if run == "first":
            assert [n for n in os.listdir(norm_cache.cache_dir()) if n.endswith(".json")]
    assert "from the norm cache" not in stderrs[0]
    assert stderrs[1].count("from the norm cache") == 3  # the second run read no tensor
    for stderr in stderrs:
        assert "vocabulary tensor(s) differ" not in stderr  # nothing guessed: no warning
        assert "over mergekit's token-aligned tensors (PermutedVocabulary)" in stderr


def test_a_merge_builds_its_tokenizer_once_for_the_pre_pass_and_the_merge(vocab_family, tmp_path, merge_options,
                                                                           monkeypatch, caplog):
    """tokenizer_source: mergekit's tokenizer build (every model's tokenizer loaded, the
    merged vocabulary, the token maps) serves both the pre-pass and the merge: it runs
    once, and says "Loading tokenizers" once, in a merge with the norms to read (cold) and
    in one with every norm from the cache (warm: the token maps still key them); the
    merge stays exact; the merge keeps none of it once both have had it; the same where
    the pre-pass needs it before mergekit runs it. A second merge builds it again (a
    tokenizer may have changed)."""
    import mergekit.tokenizer.build as build
    from merging import run_recipe

    from mergekit_metagpt.plan_inputs import SharedInputs

    paths, sds = vocab_family
    builds = []
    original = build.build_tokenizer
    monkeypatch.setattr(build, "build_tokenizer", lambda *a, **k: builds.append(1) or original(*a, **k))
    stores = []  # each merge's: empty once it ends (the build let go once both had it)
    store_init = SharedInputs.__init__
    monkeypatch.setattr(SharedInputs, "__init__", lambda self: (store_init(self), stores.append(self))[0])
    takers = []  # who asked the store, in order
    store_value = SharedInputs.value
    monkeypatch.setattr(SharedInputs, "value", lambda self, task, taker, compute: (
        takers.append(taker), store_value(self, task, taker, compute))[1])
    base, group = sds["base"], {m: sds[m] for m in ("a", "r", "b")}
    lams = closed_lambdas(base, group, [(n, n) for n in base], rows=VOCAB)
    for run in ("cold", "warm", "pre-pass first"):
        if run == "pre-pass first":  # mergekit schedules the build after the layers' merges:
            # the first merge task's pre-pass builds it, the executor takes it from the store
            monkeypatch.setattr(build.BuildTokenizer, "group_label", lambda self: "~after the layers")
        builds.clear()
        stores.clear()
        takers.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            merged = run_recipe(_vocab_recipe(paths, "union"), str(tmp_path / run), merge_options)
        assert len(builds) == 1, run
        assert takers == (["pre-pass", "merge"] if run == "pre-pass first" else ["merge", "pre-pass"]), run
        assert [len(store) for store in stores] == [0], run
        assert [r.getMessage() for r in caplog.records].count("Loading tokenizers") == 1, run
        assert ("from the norm cache" in caplog.text) == (run != "cold")
        (got,) = record_sets(str(tmp_path / run), _names(paths))
        assert_lambdas(got, lams)
        expected = base[EMBED].double() + sum(
            lams[m] * (sd[EMBED][:VOCAB].double() - base[EMBED].double()) for m, sd in group.items())
        assert (merged[EMBED][:VOCAB].double() - expected).abs().max().item() < 1e-5, run
        assert sorted(merged[EMBED][VOCAB:].tolist()) == sorted(sds["r"][EMBED][VOCAB:].tolist())
    # without the plugin's wrapper (a mergekit of another shape): built twice, as before,
    # and the pre-pass's copy not kept in the merge's store
    monkeypatch.setattr(build.BuildTokenizer, "execute", build.BuildTokenizer.execute.__wrapped__)
    builds.clear()
    stores.clear()
    run_recipe(_vocab_recipe(paths, "union"), str(tmp_path / "unwrapped"), merge_options)
    assert len(builds) == 2
    assert [len(store) for store in stores] == [0]


@pytest.mark.parametrize("vocabulary", ["union", "base", "truncated"])
def test_the_pre_pass_takes_the_aligned_tensors_of_the_task_that_runs_it(vocabulary, vocab_family, tmp_path,
                                                                          monkeypatch):
    """The merge task that runs the pre-pass (here a vocabulary tensor: mergekit runs
    lm_head first) hands it the token-aligned tensors mergekit's executor made for it: the
    pre-pass aligns only the other vocabulary tensor (3 alignments in the merge, not 4;
    mergekit aligns row by row, seconds per tensor for a large vocabulary), for
    `tokenizer_source` as for `--unsafe-truncate-embeddings`. The λ have the same bits as
    where the pre-pass aligns both itself, and the weights are the same (a union's added
    tokens' rows in mergekit's order, which changes from run to run)."""
    from mergekit.options import MergeOptions
    from mergekit.tokenizer.embed import PermutedVocabulary
    from mergekit.tokenizer.truncate import TruncatedVocabulary
    from merging import run_recipe

    from mergekit_metagpt import prepass

    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")  # each run reads every tensor
    paths, sds = vocab_family
    adapter = TruncatedVocabulary if vocabulary == "truncated" else PermutedVocabulary
    aligned = []
    original = adapter.execute
    monkeypatch.setattr(adapter, "execute", lambda self, *a, **k: aligned.append(1) or original(self, *a, **k))
    config = _vocab_recipe(paths, vocabulary)
    if vocabulary == "truncated":
        del config["tokenizer_source"]
    options = MergeOptions(copy_tokenizer=False, quiet=True, unsafe_truncate_embeddings=vocabulary == "truncated")
    base, group = sds["base"], {m: sds[m] for m in ("a", "r", "b")}
    lams = closed_lambdas(base, group, [(n, n) for n in base], rows=VOCAB)
    bits, weights = {}, {}
    compute = prepass.compute
    for run in ("given", "aligned again"):
        if run == "aligned again":
            monkeypatch.setattr(prepass, "compute", lambda *a, given=None, **k: compute(*a, **k))
        aligned.clear()
        weights[run] = run_recipe(config, str(tmp_path / run), options)
        assert len(aligned) == (3 if run == "given" else 4), run
        (got,) = record_sets(str(tmp_path / run), _names(paths))
        assert_lambdas(got, lams)
        bits[run] = {m: float(v).hex() for m, v in got.items()}
    assert bits["given"] == bits["aligned again"]
    for name, tensor in weights["given"].items():  # a union's added rows in any order (mergekit's)
        other = weights["aligned again"][name]
        assert torch.equal(tensor[:VOCAB], other[:VOCAB]), name
        assert sorted(tensor[VOCAB:].tolist()) == sorted(other[VOCAB:].tolist()), name


def test_shared_inputs_are_computed_once_whoever_asks_first_and_let_go_once_both_have_them():
    """`SharedInputs` (the tokenizer build a merge's pre-pass and executor share): the
    first to ask computes, in either order; threads asking at once wait for one
    computation; once both the pre-pass and the merge have the value it is let go, and
    a later ask computes it again, also one that looked the entry up just before (a
    third asker: an executor that runs the build once per GPU); a failed computation
    raises its error for the later askers without computing again."""
    import threading
    import time

    from mergekit_metagpt.plan_inputs import SharedInputs

    for order in (("merge", "pre-pass"), ("pre-pass", "merge")):
        shared, calls = SharedInputs(), []
        compute = lambda: calls.append(1) or object()  # noqa: E731
        first = shared.value(("task",), order[0], compute)
        assert len(shared) == 1
        assert shared.value(("task",), order[1], compute) is first
        assert len(calls) == 1 and len(shared) == 0, order
        assert shared.value(("task",), "merge", compute) is not first and len(calls) == 2

    class _LookupThenPause:
        """The store's lock, after which the thread named "late" pauses: it has looked the
        entry up and waits for its turn while the others take the value and let it go."""

        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()
            if threading.current_thread().name == "late":
                time.sleep(0.3)

    shared, calls, got = SharedInputs(), [], []
    shared._lock = _LookupThenPause()
    compute = lambda: calls.append(1) or f"value {len(calls)}"  # noqa: E731
    assert shared.value("t", "merge", compute) == "value 1"
    late = threading.Thread(name="late", target=lambda: got.append(shared.value("t", "merge", compute)))
    late.start()
    time.sleep(0.1)
    assert shared.value("t", "pre-pass", compute) == "value 1"  # both have it: let go
    late.join()
    assert got == ["value 2"]

    shared, calls = SharedInputs(), []

    def failing():
        calls.append(1)
        raise OSError("tokenizer.json unreadable")

    for taker in ("merge", "pre-pass", "merge"):
        with pytest.raises(OSError, match="unreadable"):
            shared.value("t", taker, failing)
    assert len(calls) == 1

    shared, calls, values = SharedInputs(), [], []
    start = threading.Barrier(6)

    def slow():
        calls.append(1)
        time.sleep(0.05)
        return object()

    def ask():
        start.wait()
        values.append(shared.value("t", "merge", slow))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(values) == 6 and all(v is values[0] for v in values)


def _word_tokenizer(path: str, words: List[str]) -> None:
    """A word-level tokenizer whose token i is words[i]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0]).save_pretrained(path)


@pytest.fixture(scope="module")
def token_family(tmp_path_factory):
    """base and c: 64 tokens w0..w63. a: w10 renamed "new10" (a reserved token put to
    use), its row 10 trained hard, plus "extra" at row 64; b: "extra" at row 64 too.
    Noise 0.01 / 0.03 / 0.002 elsewhere."""
    root = tmp_path_factory.mktemp("tokens")
    words = [f"w{i}" for i in range(VOCAB)]
    base = random_state_dict(51)
    sds = {"base": base}
    vocabs = {"base": words, "c": words}
    gen = torch.Generator().manual_seed(52)
    for model, scale, seed in (("a", 0.01, 1), ("b", 0.03, 2), ("c", 0.002, 3)):
        sd = noisy(base, uniform(scale), seed)
        if model in ("a", "b"):
            for name in (EMBED, HEAD):
                sd[name] = torch.cat([sd[name], torch.randn((1, sd[name].shape[1]), generator=gen) * 0.3])
            vocabs[model] = words + ["extra"]
        sds[model] = sd
    vocabs["a"] = [w if w != "w10" else "new10" for w in vocabs["a"]]
    for name in (EMBED, HEAD):
        sds["a"][name][10] = torch.randn(sds["a"][name].shape[1], generator=gen) * 0.5
    paths = {}
    for model, sd in sds.items():
        paths[model] = save_checkpoint(str(root / model), sd, vocab_size=len(vocabs[model]))
        _word_tokenizer(paths[model], vocabs[model])
    return paths, sds


@pytest.mark.parametrize("tokenizer_source", ["base", "union"])
def test_tokenizer_source_norms_are_those_of_the_token_aligned_tensors(tokenizer_source, token_family, tmp_path):
    """The merge reads mergekit's token-aligned vocabulary tensors; so do the norms.
    a lacks w10, so its row for w10 is the base's (no task vector there), whatever a did
    to row 10 (now "new10": dropped with "base"; with "union" its own token, which every
    model takes from a). "extra" (a and b, union only): the base and c take the average
    of a's and b's rows. Rows compared by position, as without alignment, give a a λ
    2.5-5 times too large."""
    paths, sds = token_family
    base, (a, b, c) = sds["base"], (sds[m] for m in ("a", "b", "c"))
    aligned = {m: {n: t.double() for n, t in sds[m].items()} for m in sds}
    for name in (EMBED, HEAD):
        for m in aligned:
            aligned[m][name] = aligned[m][name][:VOCAB].clone()
        aligned["a"][name][10] = base[name][10].double()  # w10: a lacks it, the base's row
        if tokenizer_source == "union":
            new10 = a[name][10].double()
            extra = (a[name][VOCAB].double() + b[name][VOCAB].double()) / 2
            own = {"a": a[name][VOCAB].double(), "b": b[name][VOCAB].double()}
            for m in aligned:  # rows "new10" (a's, for everyone) and "extra"
                aligned[m][name] = torch.cat([aligned[m][name], new10[None], own.get(m, extra)[None]])
    group = {m: aligned[m] for m in ("a", "b", "c")}
    lams = closed_lambdas(aligned["base"], group, [(n, n) for n in base])
    by_position = closed_lambdas(base, {m: sds[m] for m in group}, [(n, n) for n in base], rows=VOCAB)
    assert by_position["a"] > 2 * lams["a"]  # the fixture tells the two apart

    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "tokenizer_source": tokenizer_source, "models": [{"model": paths[m]} for m in group]}
    out = mergekit_yaml(config, tmp_path, "out", "-v")
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)
    merged = load_checkpoint(out)
    reference = closed_merge(aligned["base"], group, lams, [(n, n) for n in base])
    for name in (EMBED, HEAD):  # the rows of the base's 64 tokens (their ids stay)
        merged[name], reference[name] = merged[name][:VOCAB], reference[name][:VOCAB]
    assert_close(merged, reference)
    if tokenizer_source == "union":  # the same models in another order: every norm from the cache
        config["models"] = config["models"][::-1]
        result = run_mergekit_yaml(write_yaml(config, str(tmp_path / "reversed.yml")), str(tmp_path / "reversed"), "-v")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.count("from the norm cache") == 3, result.stderr[-3000:]
        (again,) = record_sets(str(tmp_path / "reversed"), _names(paths))
        assert_lambdas(again, lams)


def test_same_weight_files_with_other_tokenizers_keep_their_own_norms_when_cached(token_family, tmp_path):
    """a2 is a hardlinked copy of a's weight files (same fingerprint) with a tokenizer
    that also renames w20..w29: its aligned rows for those are the base's, so its norm is
    not a's. Both runs, the second from the norm cache (one entry for both: same files),
    give each its own λ."""
    paths, sds = token_family
    a2 = str(tmp_path / "a2")
    os.makedirs(a2)
    for name in os.listdir(paths["a"]):
        if name.endswith(".safetensors") or name.endswith(".json") and "token" not in name:
            os.link(os.path.join(paths["a"], name), os.path.join(a2, name))
    words = [f"w{i}" for i in range(VOCAB)] + ["extra"]
    words[10] = "new10"
    _word_tokenizer(a2, [w if not 20 <= i < 30 else f"r{i}" for i, w in enumerate(words)])
    base = sds["base"]
    aligned = {m: {n: t.double() for n, t in sds[m].items()} for m in ("base", "a", "c")}
    aligned["a2"] = {n: t.double() for n, t in sds["a"].items()}
    for name in (EMBED, HEAD):
        for m in aligned:
            aligned[m][name] = aligned[m][name][:VOCAB].clone()
        for m, rows in (("a", [10]), ("a2", [10, *range(20, 30)])):  # tokens it lacks: the base's rows
            aligned[m][name][rows] = base[name][rows].double()
    group = {m: aligned[m] for m in ("a", "a2", "c")}
    lams = closed_lambdas(aligned["base"], group, [(n, n) for n in base])
    assert lams["a"] - lams["a2"] > 0.01  # the fixture tells the two apart (λ compared to 1e-6)
    names = dict(_names(paths), **{a2: "a2"})
    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "tokenizer_source": "base", "models": [{"model": paths["a"]}, {"model": a2}, {"model": paths["c"]}]}
    stderrs = []
    for run in ("cold", "warm"):
        out = str(tmp_path / run)
        result = run_mergekit_yaml(write_yaml(config, str(tmp_path / f"{run}.yml")), out, "-v")
        assert result.returncode == 0, result.stderr[-3000:]
        stderrs.append(result.stderr)
        (got,) = record_sets(out, names)
        assert_lambdas(got, lams)
    assert "from the norm cache" not in stderrs[0] and stderrs[1].count("from the norm cache") == 3


@pytest.mark.parametrize("value, dtype, what", [
    (float("nan"), "float32", "NaN or Inf"),
    # finite in the file, Inf once cast to the recipe's float16
    (1e5, "float16", "NaN or Inf; read as float16, which holds nothing beyond ±65504 (a `dtype: float16` cast "
                     "of larger values gives Inf)"),
])
@pytest.mark.parametrize("source", ["union", "base"])
@pytest.mark.parametrize("name", [EMBED, HEAD])
def test_a_nan_row_another_model_takes_is_blamed_on_its_own_model(name, source, value, dtype, what, token_family,
                                                                   tmp_path):
    """With "union", the base takes the average of a's and b's rows for "extra": a NaN in
    b's row is b's, named as such before anything is written, not the base's. With "base"
    the alignment drops b's row for "extra": a NaN there is refused all the same, as in
    any weight of any input. Also in lm_head, whose merge task (mergekit's first) gives
    the pre-pass its aligned tensors, which hold no dropped row."""
    paths, sds = token_family
    b = {n: t.clone() for n, t in sds["b"].items()}
    b[name][VOCAB, 3] = value
    paths = dict(paths, b=save_checkpoint(str(tmp_path / "b"), b, vocab_size=VOCAB + 1))
    _word_tokenizer(paths["b"], [f"w{i}" for i in range(VOCAB)] + ["extra"])
    config = write_yaml({"merge_method": "metagpt", "base_model": paths["base"], "dtype": dtype,
                         "tokenizer_source": source, "models": [{"model": paths[m]} for m in "abc"]},
                        str(tmp_path / "r.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(config, out)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"non-finite values ({what}) in tensor {name!r} of model {paths['b']}" in last, last
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]


def _truncation_family(tmp_path):
    """base 68 vocabulary rows, a 64, b 66 (rows beyond 64 far off)."""
    gen = torch.Generator().manual_seed(7)
    base = random_state_dict(41)
    for name in (EMBED, HEAD):  # the base has 4 rows more than the others' first 64
        base[name] = torch.cat([base[name], torch.randn((4, base[name].shape[1]), generator=gen)]).contiguous()
    sds = {"base": base}
    for model, rows, scale, tail in (("a", 64, 0.03, 0.0), ("b", 66, 0.01, 2.0)):
        sd = noisy(base, uniform(scale), ord(model))
        for name in (EMBED, HEAD):  # rows beyond 64 differ a lot: they must not count
            sd[name] = sd[name][:rows].clone()
            sd[name][64:] += tail
        sds[model] = sd
    paths = {n: save_checkpoint(str(tmp_path / n), sd, vocab_size=sd[EMBED].shape[0]) for n, sd in sds.items()}
    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "models": [{"model": paths[m]} for m in ("a", "b")]}
    return base, sds, paths, config


def _truncated(lines) -> list:
    """The tensors named by mergekit's UNSAFE truncation warnings among `lines`."""
    return sorted(line.split("UNSAFE vocabulary truncation for ")[1].split(":")[0]
                  for line in lines if "UNSAFE vocabulary truncation for" in line)


def test_unsafe_truncated_vocabulary_counts_the_rows_the_whole_group_keeps(tmp_path, capsys, caplog, monkeypatch):
    """--unsafe-truncate-embeddings keeps the smallest vocabulary of the whole group
    (base 68 rows, a 64, b 66: 64 rows for everyone); b's norm counts those 64 rows,
    not the 66 it shares with the base. mergekit's UNSAFE warning comes once per tensor, as
    for its own methods, though the pre-pass runs the truncation too; and from the CLI,
    which only plans."""
    base, sds, paths, config = _truncation_family(tmp_path)
    group = {m: sds[m] for m in ("a", "b")}
    lams = closed_lambdas(base, group, [(n, n) for n in base], rows=64)
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(write_yaml(config, str(tmp_path / "out.yml")), out, "--unsafe-truncate-embeddings")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _truncated(result.stderr.splitlines()) == sorted([EMBED, HEAD]), result.stderr[-3000:]
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)
    # the CLI takes the same option; without it the vocabularies differ, which a merge
    # refuses: so does the CLI, naming the tensor and both ways to align them
    from mergekit_metagpt.cli import main

    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")  # its own pre-pass, not the merge's norms
    assert main(["coefficients", str(tmp_path / "out.yml"), "--json", "--unsafe-truncate-embeddings"]) == 0
    assert _truncated(r.getMessage() for r in caplog.records) == sorted([EMBED, HEAD])
    (entry,) = json.loads(capsys.readouterr().out)["merges"]
    assert_lambdas({_names(paths)[row["model"]]: row["lambda"] for row in entry["models"]}, lams)
    assert main(["coefficients", str(tmp_path / "out.yml"), "--json"]) == 1
    error = capsys.readouterr().err
    assert "shape mismatch for tensor" in error and "--unsafe-truncate-embeddings" in error, error
    merged = load_checkpoint(out)
    for name in (EMBED, HEAD):
        assert merged[name].shape[0] == 64
        expected = base[name][:64].double() + sum(
            lams[m] * (sd[name][:64].double() - base[name][:64].double()) for m, sd in group.items()
        )
        assert (merged[name].double() - expected).abs().max().item() < 1e-5, name


# =====================================================================================
# 4. tied embeddings
# =====================================================================================
def tied_state_dict(sd: StateDict) -> StateDict:
    """sd with lm_head the very tensor embed_tokens is (as a tied model holds it)."""
    out = {k: v for k, v in sd.items() if k != HEAD}
    out[HEAD] = out[EMBED]
    return out


def test_a_merge_stopped_by_its_pre_pass_still_shows_mergekits_truncation_warnings(tmp_path):
    """The pre-pass holds back the UNSAFE warnings of the tensors it truncates, as the merge
    truncates them again; where it stops the merge (a NaN in a tensor it reads after the
    embeddings), the merge never does, and the held warnings are logged before the error."""
    _, sds, paths, config = _truncation_family(tmp_path)
    sd = dict(sds["b"])
    sd["model.norm.weight"] = sd["model.norm.weight"].clone()
    sd["model.norm.weight"][0] = float("nan")
    save_checkpoint(paths["b"], sd, vocab_size=sd[EMBED].shape[0])
    result = run_mergekit_yaml(write_yaml(config, str(tmp_path / "out.yml")), str(tmp_path / "out"),
                               "--unsafe-truncate-embeddings")
    assert result.returncode != 0
    assert "non-finite values" in result.stderr and "'model.norm.weight'" in result.stderr, result.stderr[-3000:]
    assert _truncated(result.stderr.splitlines()) == sorted([EMBED, HEAD]), result.stderr[-3000:]


def fitted_lambdas(merged: StateDict, base: StateDict, models: Dict[str, StateDict], names) -> Dict[str, float]:
    """The λ that explain merged − base = Σ λ_m (θ_m − θ₀) (least squares, float64)."""
    columns = [torch.cat([(models[m][n].double() - base[n].double()).reshape(-1) for n in names]) for m in models]
    target = torch.cat([(merged[n].double() - base[n].double()).reshape(-1) for n in names])
    solution = torch.linalg.lstsq(torch.stack(columns, 1), target[:, None]).solution[:, 0]
    return dict(zip(models, solution.tolist()))


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    return make_tied_family(tmp_path_factory.mktemp("tied"))


def make_tied_family(root):
    """A tied base and two tied fine-tunes; a has most of its noise in the embeddings."""
    base = tied_state_dict(random_state_dict(31, tie_word_embeddings=True))
    sds = {
        "base": base,
        "a": tied_state_dict(noisy(base, by_part(embed=0.1, layers=(0.01, 0.01), norm=0.01), 1)),
        "b": tied_state_dict(noisy(base, uniform(0.03), 2)),
    }
    paths = {}
    for name, sd in sds.items():
        paths[name] = save_checkpoint(str(root / name), {k: v for k, v in sd.items() if k != HEAD},
                                      tie_word_embeddings=True)
        assert HEAD not in load_checkpoint(paths[name])
    return paths, sds


def test_tied_modules_in_memory_count_the_shared_tensor_once(tied_family, tmp_path, capsys):
    """merge_state_dicts with nn.Module inputs whose lm_head is embed_tokens: the same λ
    as the closed form counting that tensor once, and as the CLI on the same checkpoints."""
    from transformers import LlamaForCausalLM

    from checkpoints import llama_config
    from mergekit.merge_methods import merge_state_dicts
    from mergekit_metagpt.cli import main

    paths, sds = tied_family
    modules = {}
    for name, sd in sds.items():
        module = LlamaForCausalLM(llama_config(tie_word_embeddings=True))
        module.load_state_dict({k: v for k, v in sd.items() if k != HEAD}, strict=False)
        assert module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
        modules[name] = module
    with torch.no_grad():
        merged = merge_state_dicts(modules, "metagpt", base="base")
    base = sds["base"]
    group = {m: sds[m] for m in "ab"}
    unique = [(n, n) for n in base if n != HEAD]
    lams = closed_lambdas(base, group, unique)
    twice = closed_lambdas(base, group, unique + [(HEAD, HEAD)])
    assert abs(lams["a"] - twice["a"]) > 0.05  # the fixture tells the two apart
    assert_lambdas(fitted_lambdas(merged, base, group, [n for n, _ in unique]), lams, tol=1e-5)
    assert_close(merged, closed_merge(base, group, lams, unique + [(HEAD, EMBED)]))

    config = write_yaml({"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
                         "models": [{"model": paths[m]} for m in "ab"]}, str(tmp_path / "r.yml"))
    capsys.readouterr()
    assert main(["coefficients", config, "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["merges"]
    names = _names(paths)
    assert_lambdas({names[row["model"]]: row["lambda"] for row in entry["models"]}, lams)


def test_tied_base_lm_head_is_read_from_its_embeddings(tied_family, tmp_path):
    """Base saved tied (no lm_head in its files), fine-tunes with their own lm_head: the
    merge reads the base's lm_head from embed_tokens (mergekit's tied_names), and the
    λ count θ_lm_head − θ₀_embed_tokens."""
    paths, sds = tied_family
    root = tmp_path / "untied"
    base = sds["base"]
    untied = {}
    for name, scales in {"a": by_part(embed=0.01, layers=(0.01, 0.01), norm=0.01, head=0.1),
                         "b": uniform(0.03)}.items():
        sd = noisy(base, scales, 40 + len(untied))
        sd[HEAD] = sd[HEAD].clone()
        untied[name] = sd
        paths = {**paths, name: save_checkpoint(str(root / name), sd)}
        assert HEAD in load_checkpoint(paths[name])
    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "models": [{"model": paths[m]} for m in "ab"]}
    out = mergekit_yaml(config, tmp_path, "out")
    reads = [(n, n) for n in base]
    lams = closed_lambdas(base, untied, reads, base_name=lambda n: EMBED if n == HEAD else n)
    without_head = closed_lambdas(base, untied, [(n, n) for n in base if n != HEAD])
    assert abs(lams["a"] - without_head["a"]) > 0.05  # the fixture tells the two apart
    merged = load_checkpoint(out)
    tied_base = {**base, HEAD: base[EMBED]}
    assert_close(merged, closed_merge(tied_base, untied, lams, reads))
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)


def test_a_tied_model_beside_an_untied_one_counts_its_embeddings_for_lm_head_too(tied_family, tmp_path):
    """One untied input makes mergekit write an lm_head, which it reads from each tied
    model's embed_tokens (and the tied base's): that change counts once as embed_tokens and
    once as lm_head, as the merge applies it twice; so an untied model changes the λ of
    the tied ones."""
    paths, sds = tied_family
    base = sds["base"]
    untied = noisy(base, by_part(embed=0.01, layers=(0.01, 0.01), norm=0.01, head=0.05), 45)
    untied[HEAD] = untied[HEAD].clone()
    paths = {**paths, "c": save_checkpoint(str(tmp_path / "c"), untied)}
    models = {"a": sds["a"], "c": untied}  # a: tied, most of its change in the embeddings
    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "models": [{"model": paths[m]} for m in models]}
    out = mergekit_yaml(config, tmp_path, "out")
    reads = [(n, n) for n in base]  # lm_head too: a's (and the base's) is its embed_tokens
    lams = closed_lambdas(base, models, reads, base_name=lambda n: EMBED if n == HEAD else n)
    once = closed_lambdas(base, models, [(n, n) for n in base if n != HEAD])
    assert abs(lams["a"] - once["a"]) > 0.05  # the fixture tells the two apart
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)
    merged = load_checkpoint(out)
    assert HEAD in merged
    assert_close(merged, closed_merge({**base, HEAD: base[EMBED]}, models, lams, reads))


def test_a_tied_model_of_an_untied_base_is_warned_of_and_counted_as_merged(tied_family, tmp_path, caplog):
    """An untied base (an lm_head of its own) with a fine-tune saved tied (a): mergekit
    reads a's embed_tokens for lm_head, so a's task vector there is embed − lm_head₀, no
    fine-tuning change, and it dominates a's λ. Counted as the merge applies it (λ as the
    closed form of what is read), and a WARNING names a and the tensor; none for the
    untied model c, nor for a tied base beside an untied fine-tune (the lm_head both read
    is then the base's own embed_tokens), nor for a base that stores an lm_head equal to
    its embed_tokens."""
    from mergekit_metagpt.cli import main

    paths, sds = tied_family
    base = {**sds["base"], HEAD: torch.randn(sds["base"][EMBED].shape, generator=torch.Generator().manual_seed(7))
            * 0.05}
    untied = noisy(base, uniform(0.02), 46)
    paths = {**paths, "u": save_checkpoint(str(tmp_path / "u"), base),
             "c": save_checkpoint(str(tmp_path / "c"), untied)}
    models = {"a": sds["a"], "c": untied}
    config = {"merge_method": "metagpt", "base_model": paths["u"], "dtype": "float32",
              "models": [{"model": paths[m]} for m in models]}
    path = write_yaml(config, str(tmp_path / "r.yml"))
    out = str(tmp_path / "out")
    result = run_mergekit_yaml(path, out)
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if "has tied embeddings where the base model" in line]
    assert len(warned) == 1 and f"model {paths['a']} has tied embeddings where the base model {paths['u']} " \
        f"has its own 'lm_head.weight' (read as 'model.embed_tokens.weight')" in warned[0], result.stderr[-3000:]
    heads = {"a": {**sds["a"], HEAD: sds["a"][EMBED]}, "c": untied}
    lams = closed_lambdas(base, heads, [(n, n) for n in base])
    assert lams["a"] > 0.8  # a's lm_head "change" dominates
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)
    # the tied base beside the untied fine-tune: no such warning
    tied_base = dict(config, base_model=paths["base"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
        assert main(["coefficients", write_yaml(tied_base, str(tmp_path / "tied.yml"))]) == 0
    assert "has tied embeddings" not in caplog.text
    # nor for a base that stores its lm_head equal to its embed_tokens (a .bin save, a
    # converted checkpoint): the tied model's change there is a fine-tuning change
    stored = save_checkpoint(str(tmp_path / "stored"), {**sds["base"], HEAD: sds["base"][EMBED].clone()})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
        assert main(["coefficients", write_yaml(dict(config, base_model=stored), str(tmp_path / "s.yml"))]) == 0
    assert "has tied embeddings" not in caplog.text


def test_in_memory_a_tied_module_beside_an_untied_one_counts_its_embeddings_twice(tied_family):
    """merge_state_dicts with a tied base and tied model beside an untied one: the merged
    lm_head and embed_tokens differ (the untied model's lm_head), and each applies the tied
    model's embedding change, so it counts twice, as in the merge of the same checkpoints
    above; counted once only where every input is tied (the test before)."""
    from transformers import LlamaForCausalLM

    from checkpoints import llama_config
    from mergekit.merge_methods import merge_state_dicts

    _, sds = tied_family
    base = sds["base"]
    untied = noisy(base, by_part(embed=0.01, layers=(0.01, 0.01), norm=0.01, head=0.05), 45)
    untied[HEAD] = untied[HEAD].clone()
    modules = {}
    for name, sd, tied in (("base", base, True), ("a", sds["a"], True), ("c", untied, False)):
        module = LlamaForCausalLM(llama_config(tie_word_embeddings=tied))
        module.load_state_dict({k: v for k, v in sd.items() if not (tied and k == HEAD)}, strict=False)
        shared = module.lm_head.weight.data_ptr() == module.model.embed_tokens.weight.data_ptr()
        assert shared == tied
        modules[name] = module
    with torch.no_grad():
        merged = merge_state_dicts(modules, "metagpt", base="base")
    models = {"a": sds["a"], "c": untied}
    reads = [(n, n) for n in base]
    lams = closed_lambdas(base, models, reads, base_name=lambda n: EMBED if n == HEAD else n)
    once = closed_lambdas(base, models, [(n, n) for n in base if n != HEAD])
    assert abs(lams["a"] - once["a"]) > 0.05  # the fixture tells the two apart
    heads = {"a": {**sds["a"], HEAD: sds["a"][EMBED]}, "c": untied}
    assert_lambdas(fitted_lambdas(merged, {**base, HEAD: base[EMBED]}, heads, [n for n, _ in reads]), lams, tol=1e-5)
    assert_close(merged, closed_merge({**base, HEAD: base[EMBED]}, heads, lams, reads))


# =====================================================================================
# 5. mergekit-pytorch: raw safetensors files
# =====================================================================================
@pytest.fixture(scope="module")
def raw_family(tmp_path_factory):
    return make_raw_family(tmp_path_factory.mktemp("raw"))


def make_raw_family(root):
    from safetensors.torch import save_file

    base = random_state_dict(51)
    sds = {
        "base": base,
        "a": noisy(base, uniform(0.01), 1),
        "b": noisy(base, uniform(0.03), 2),
        "c": noisy(base, by_part(embed=0.1, layers=(0.02, 0.01), norm=0.02, head=0.01), 3),
    }
    paths = {}
    for name, sd in sds.items():
        paths[name] = str(root / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, paths[name])
    return paths, sds


def mergekit_pytorch(config: dict, tmp_path, name: str, *flags: str, env=None):
    path = write_yaml(config, str(tmp_path / f"{name}.yml"))
    out = str(tmp_path / name)
    result = subprocess.run(
        [os.path.join(BIN, "mergekit-pytorch"), path, out, "--quiet", *flags],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _raw_recipe(paths, method, parameters=None, models=None):
    config = {"merge_method": method, "base_model": paths["base"], "dtype": "float32",
              "models": models or [{"model": paths[m]} for m in "abc"]}
    if parameters:
        config["parameters"] = parameters
    return config


def test_mergekit_pytorch_metagpt_matches_closed_form_and_writes_the_record(raw_family, tmp_path):
    paths, sds = raw_family
    out = mergekit_pytorch(_raw_recipe(paths, "metagpt", {"lambda": 0.7}), tmp_path, "out")
    base = sds["base"]
    group = {m: sds[m] for m in "abc"}
    reads = [(n, n) for n in base]
    lams = closed_lambdas(base, group, reads)
    assert_close(load_checkpoint(out), closed_merge(base, group, lams, reads, scale=0.7))
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)


@pytest.mark.parametrize("ours, stock", [("metagpt_ties", "ties"), ("metagpt_dare", "dare_linear"),
                                         ("metagpt_dare_ties", "dare_ties")])
def test_mergekit_pytorch_variants_equal_stock_with_lambda_weights(ours, stock, raw_family, tmp_path):
    paths, sds = raw_family
    env = {"PYTHONHASHSEED": "0"}  # mergekit-pytorch plans from a set of names: one order
    out = mergekit_pytorch(_raw_recipe(paths, ours, {"density": 0.6}), tmp_path, "ours",
                           "--random-seed", "7", env=env)
    base = sds["base"]
    lams = closed_lambdas(base, {m: sds[m] for m in "abc"}, [(n, n) for n in base])
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)
    stock_models = [{"model": paths[m], "parameters": {"weight": lams[m], "density": 0.6}} for m in "abc"]
    theirs = mergekit_pytorch(_raw_recipe(paths, stock, {"normalize": False}, stock_models), tmp_path,
                              "stock", "--random-seed", "7", env=env)
    mine, reference = load_checkpoint(out), load_checkpoint(theirs)
    assert set(mine) == set(base)
    for name in base:
        assert torch.allclose(mine[name], reference[name], atol=2e-6, rtol=0), name


@pytest.mark.parametrize("flag", ["--tensor-union", "--tensor-intersection"])
def test_mergekit_pytorch_union_and_intersection_count_what_each_merges(flag, raw_family, tmp_path):
    """A tensor model b lacks: with --tensor-union it is merged from a and c, and adds
    nothing to b's norm (b keeps its global λ, as in the merge); with
    --tensor-intersection no model's norm counts it, and it is not written."""
    from safetensors.torch import save_file

    paths, sds = raw_family
    lacking = "model.layers.1.mlp.down_proj.weight"
    b = {k: v for k, v in sds["b"].items() if k != lacking}
    paths = {**paths, "b": str(tmp_path / "b-lacking.safetensors")}
    save_file({k: v.contiguous() for k, v in b.items()}, paths["b"])
    out = mergekit_pytorch(_raw_recipe(paths, "metagpt"), tmp_path, "out", flag)
    base, models = sds["base"], {"a": sds["a"], "b": b, "c": sds["c"]}
    union = flag == "--tensor-union"
    names = [n for n in base if union or n != lacking]
    norms = {m: sum(sq(sd[n], base[n]) for n in names if n in sd) for m, sd in models.items()}
    lams = {m: v / sum(norms.values()) for m, v in norms.items()}
    (got,) = record_sets(out, _names(paths))
    assert_lambdas(got, lams)
    merged = load_checkpoint(out)
    assert set(merged) == set(names)
    for name in names:
        want = base[name].double() + sum(
            lams[m] * (sd[name].double() - base[name].double()) for m, sd in models.items() if name in sd)
        assert (merged[name].double() - want).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("hash_seed", ["0", "10"])
def test_a_tensor_the_base_lacks_is_refused_naming_the_models_that_hold_it(hash_seed, raw_family, tmp_path):
    """--tensor-union plans a tensor that only model a holds: no task vector without the
    base's tensor (stock: "Base input is not present"); the message names a, not b or c,
    and nothing is written. The order of mergekit's tasks follows the hash seed (a set of
    names): with 0 the pre-pass finds it, with 10 that tensor's task runs first, and
    mergekit's own check of its inputs, before the method's work, said it as stock does."""
    from safetensors.torch import save_file

    paths, sds = raw_family
    a = {**sds["a"], "extra.adapter.weight": torch.ones(4, 4)}
    paths = {**paths, "a": str(tmp_path / "a-extra.safetensors")}
    save_file({k: v.contiguous() for k, v in a.items()}, paths["a"])
    path = write_yaml(_raw_recipe(paths, "metagpt"), str(tmp_path / "extra.yml"))
    out = str(tmp_path / "out")
    result = subprocess.run([os.path.join(BIN, "mergekit-pytorch"), path, out, "--quiet", "--tensor-union"],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONHASHSEED=hash_seed))
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line == (f"Error: MetaGPT: the base model {paths['base']} has no tensor 'extra.adapter.weight', "
                    f"which model(s) {paths['a']} have"), result.stderr[-3000:]
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]


def test_mergekit_pytorch_refuses_a_path_with_a_space_before_reading(raw_family, tmp_path):
    """mergekit-pytorch 0.1.5 serialises each model's path while it merges, and fails on a
    space or '"' ("Circular reference detected"), whatever the method: said at once, by
    name, before the pre-pass reads anything."""
    paths, _ = raw_family
    spaced = str(tmp_path / "math model.safetensors")
    os.symlink(paths["a"], spaced)
    path = write_yaml(_raw_recipe({**paths, "a": spaced}, "metagpt"), str(tmp_path / "r.yml"))
    out = str(tmp_path / "out")
    result = subprocess.run([os.path.join(BIN, "mergekit-pytorch"), path, out, "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: model {spaced}: mergekit-pytorch 0.1.5 fails on this path (") and \
        "Circular reference detected" in line and line.endswith(
            "a path holding a space or '\"'), whatever the method: rename the file"), result.stderr[-2000:]
    assert "MetaGPT norm pre-pass" not in result.stderr and not os.path.exists(out)


def _damaged(paths, tmp_path):
    data = open(paths["b"], "rb").read()
    cut = str(tmp_path / "b-cut.safetensors")
    with open(cut, "wb") as f:
        f.write(data[:-200])
    return {**paths, "b": cut}, str(tmp_path / "out"), (
        f"Error: cannot load model {cut}: SafetensorError: Error while deserializing header")


def _nested(paths, tmp_path):
    from safetensors.torch import load_file

    nested = str(tmp_path / "b-nested.pt")
    torch.save({"state_dict": load_file(paths["b"]), "epoch": 3}, nested)
    return {**paths, "b": nested}, str(tmp_path / "out"), (
        f"Error: model {nested} holds its tensors under 'state_dict': mergekit-pytorch 0.1.5 lists")


def _into_an_input(paths, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    inside = os.path.join(out, "model.safetensors")  # the name of mergekit-pytorch's output
    shutil.copyfile(paths["b"], inside)
    return {**paths, "b": inside}, out, f"Error: the output folder {out} holds model {inside}, under a name"


def _scalar_lazily(paths, tmp_path):
    from safetensors.torch import load_file

    counted = {}
    for name, path in paths.items():  # every input with the same counter: merged, but not lazily
        counted[name] = str(tmp_path / f"{name}-counted.bin")
        torch.save({**load_file(path), "steps": torch.tensor(3)}, counted[name])
    return counted, str(tmp_path / "out"), (
        f"Error: model {counted['a']} holds a 0-dimensional tensor, 'steps', which mergekit 0.1.5's "
        f"--lazy-unpickle cannot read")


def _cuda(paths, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine where torch finds no CUDA device")
    return paths, str(tmp_path / "out"), "Error: --cuda: torch finds no CUDA device here"


@pytest.mark.parametrize("case", [_damaged, _nested, _scalar_lazily, _into_an_input, _cuda],
                         ids=lambda f: f.__name__[1:])
def test_mergekit_pytorch_refuses_bad_inputs_before_reading(case, raw_family, tmp_path):
    """mergekit-pytorch runs no run_merge: its MetaGPT recipes' inputs and options are
    checked by the plan_flat_merge wrapper, in one line naming the file, before the
    pre-pass reads anything. A damaged file (mergekit: a traceback naming no file), a
    pickle holding its tensors under 'state_dict' (mergekit lists them, then fails
    mid-merge on a KeyError), a pickle holding a 0-dimensional tensor under --lazy-unpickle
    (mergekit's TypeError mid-merge), an output folder holding an input (mergekit wrote the merge
    over it, exit 0), --cuda without CUDA (mergekit: "Torch not compiled with CUDA
    enabled" after planning)."""
    paths, _ = raw_family
    paths, out, expected = case(paths, tmp_path)
    before = {p: open(p, "rb").read() for p in paths.values()}
    path = write_yaml(_raw_recipe(paths, "metagpt"), str(tmp_path / "r.yml"))
    flags = {_cuda: ["--cuda"], _scalar_lazily: ["--lazy-unpickle"]}.get(case, [])
    result = subprocess.run([os.path.join(BIN, "mergekit-pytorch"), path, out, *flags],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-3000:]
    assert "MetaGPT norm pre-pass" not in result.stderr, result.stderr[-3000:]
    assert {p: open(p, "rb").read() for p in paths.values()} == before
    written = sorted(os.listdir(out)) if os.path.isdir(out) else []
    assert written == (["model.safetensors"] if case is _into_an_input else []), written


def test_mergekit_pytorch_checks_refuse_nothing_the_merge_would_do_right(raw_family, tmp_path):
    """The checks above refuse no merge mergekit completes: a 0-dimensional tensor the
    merge never reads under --lazy-unpickle (the base's alone: mergekit plans the names of
    the models), and an output folder holding inputs under names mergekit does not write."""
    from safetensors.torch import load_file

    paths, sds = raw_family
    out = str(tmp_path / "out")
    os.makedirs(out)
    inside = {m: os.path.join(out, f"{m}.safetensors") for m in "abc"}
    for m in "abc":
        shutil.copyfile(paths[m], inside[m])
    counted = str(tmp_path / "base-counted.bin")
    torch.save({**load_file(paths["base"]), "steps": torch.tensor(3)}, counted)
    config = _raw_recipe({**inside, "base": counted}, "metagpt")
    path = write_yaml(config, str(tmp_path / "r.yml"))
    result = subprocess.run([os.path.join(BIN, "mergekit-pytorch"), path, out, "--quiet", "--lazy-unpickle"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    base = sds["base"]
    lams = closed_lambdas(base, {m: sds[m] for m in "abc"}, [(n, n) for n in base])
    assert_close(load_checkpoint(out), closed_merge(base, {m: sds[m] for m in "abc"}, lams, [(n, n) for n in base]))


# =====================================================================================
# 6. mergekit-multi
# =====================================================================================
def mergekit_multi(paths, first: str, tmp_path):
    """mergekit-multi on two MetaGPT recipes: step1 merges `first` and b, the final merge
    step1 and c. (result, intermediate folder, output folder)."""
    docs = [
        {"name": "step1", "merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
         "models": [{"model": first}, {"model": paths["b"]}]},
        {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
         "models": [{"model": "step1"}, {"model": paths["c"]}]},
    ]
    config = str(tmp_path / "multi.yml")
    with open(config, "w") as f:
        yaml.safe_dump_all(docs, f)
    inter, out = str(tmp_path / "inter"), str(tmp_path / "out")
    result = subprocess.run(
        [os.path.join(BIN, "mergekit-multi"), config, "--intermediate-dir", inter, "--out-path", out,
         "--no-copy-tokenizer", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    return result, inter, out


def test_mergekit_multi_matches_closed_form(slice_family, tmp_path):
    """An intermediate MetaGPT merge feeding a final one, each with its own λ."""
    paths, sds = slice_family
    result, inter, out = mergekit_multi(paths, paths["a"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    base = sds["base"]
    reads = [(n, n) for n in base]
    first = {m: sds[m] for m in "ab"}
    lams1 = closed_lambdas(base, first, reads)
    step1 = load_checkpoint(os.path.join(inter, "step1"))
    assert_close(step1, closed_merge(base, first, lams1, reads))
    second = {"step1": step1, "c": sds["c"]}
    lams2 = closed_lambdas(base, second, reads)
    assert_close(load_checkpoint(out), closed_merge(base, second, lams2, reads))
    names = {**_names(paths), os.path.join(inter, "step1"): "step1"}
    (got,) = record_sets(out, names)
    assert_lambdas(got, lams2)


def test_mergekit_multi_refuses_a_path_it_cannot_serialise_in_one_line(slice_family, tmp_path):
    """mergekit-multi serialises every recipe before its first merge; mergekit 0.1.5 fails
    on a path holding a space ("Circular reference detected", a traceback): one line naming
    the merge and the model, nothing written."""
    paths, _ = slice_family
    spaced = str(tmp_path / "model a")
    os.symlink(paths["a"], spaced)
    result, inter, out = mergekit_multi(paths, spaced, tmp_path)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: MetaGPT: merge 'step1' of the mergekit-multi file: model {spaced}: mergekit "
                           "0.1.5 cannot serialise it (") and line.endswith(
        "whatever the method: rename the folder (mergekit-multi writes every recipe out)"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not os.path.exists(out)
    assert not os.path.exists(inter) or not os.listdir(inter)  # (mergekit-multi makes the folder first)


def test_a_tensor_planned_twice_counts_once_and_from_other_inputs_is_refused(llama_family):
    """mergekit 0.1.5 plans some tensors more than once (Qwen2-VL's projector; end to end in
    test_architectures): the same reads under one output name count once, and the repeat
    merges with the first's λ. One output name planned from other inputs would leave in the
    merged model whichever mergekit writes last: refused, named."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from merging import recipe
    from mergekit_metagpt.errors import MetaGPTError
    from mergekit_metagpt.merge_plan import MergeRun
    from mergekit_metagpt.planning import plan_recipe

    paths, _ = llama_family
    config = MergeConfiguration.model_validate(recipe(paths, ["model0", "model1"]))
    run = plan_recipe(config, MergeOptions())
    (merge_set,) = run.sets.values()
    tasks = list(merge_set.tasks)
    again = tasks[3].model_copy()  # the same task planned once more (an equal, separate object)
    twice = MergeRun(run.method_name, [*tasks, again])
    (twice_set,) = twice.sets.values()
    assert len(twice_set.tasks) == len(tasks)
    assert twice.set_of(again) is twice_set and twice.index_in_set(again) == 3 and twice.repeats == [again]
    # planned again with another value of a parameter (a gradient's value at another layer)
    from mergekit.common import ImmutableMap

    name = re.escape(tasks[3].output_weight.name)
    scaled = tasks[3].model_copy(update={"parameters": ImmutableMap({**dict(tasks[3].parameters.items()),
                                                                     "lambda": 0.7})})
    with pytest.raises(MetaGPTError, match=rf"plans output tensor '{name}' more than once .*with other values of "
                                           rf"lambda \(lambda: 1\.0 and 0\.7\).*a `filter:` matching '{name}'"):
        MergeRun(run.method_name, [*tasks, scaled])
    other = tasks[4].model_copy(update={"output_weight": tasks[3].output_weight})
    first, second = (re.escape(t.output_weight.name) for t in tasks[3:5])
    with pytest.raises(MetaGPTError, match=rf"mergekit plans output tensor '{first}' twice, from other inputs "
                                           rf"\(.*/base \(base\): '{first}', .*/model0: '{first}'.*; and .*/base "
                                           rf"\(base\): '{second}', .*whichever it writes last"):
        MergeRun(run.method_name, [*tasks, other])
