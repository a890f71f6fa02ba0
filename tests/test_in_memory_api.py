"""mergekit's in-memory API: merge_state_dicts and merge_tensors."""

import logging
import re

import pytest
import torch

import mergekit_metagpt  # noqa: F401
from checkpoints import closed_form, perturbed, random_state_dict
from mergekit.merge_methods import merge_state_dicts, merge_tensors

from mergekit_metagpt.errors import MetaGPTError


def _models(seed=0):
    base = random_state_dict(seed)
    return {"base": base, "a": perturbed(base, 0.01, 1), "b": perturbed(base, 0.05, 2), "c": perturbed(base, 0.2, 3)}


def test_merge_state_dicts_matches_closed_form_with_global_norms():
    sds = _models()
    merged = merge_state_dicts(sds, "metagpt", base="base")
    lams, reference = closed_form(sds["base"], [sds[k] for k in "abc"])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name
    # global, not per tensor: a per-tensor λ would differ on at least one tensor
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = {k: sds[k][name] - sds["base"][name] for k in "abc"}
    per_tensor = {k: float(d.double().pow(2).sum()) for k, d in deltas.items()}
    tot = sum(per_tensor.values())
    assert any(abs(per_tensor[k] / tot - lam) > 1e-4 for k, lam in zip("abc", lams))


def test_normalize_false_is_accepted_and_true_refused_in_memory():
    """normalize: false (as copied from a ties or task_arithmetic call) is what MetaGPT
    does: the same merge; true is refused, saying why (mergekit's own refusal of the name
    says nothing)."""
    from mergekit_metagpt.errors import MetaGPTError

    sds = _models()
    from mergekit.merge_methods.base import PerGroupValues

    _, reference = closed_form(sds["base"], [sds[k] for k in "abc"])
    # mergekit's own ways to say false: a bool, a string pydantic reads, per-group values
    for value in (False, "false", PerGroupValues([False] * len(sds["base"]))):
        merged = merge_state_dicts(sds, "metagpt", base="base", parameters={"normalize": value})
        for name, ref in reference.items():
            assert (merged[name].double() - ref).abs().max().item() < 1e-5, (value, name)
    with pytest.raises(MetaGPTError, match=r"^normalize must be false for metagpt, or left out \(got True\): MetaGPT's λ sum "
                                           r"to 1 .*which is not MetaGPT's merge$"):
        merge_state_dicts(sds, "metagpt", base="base", parameters={"normalize": True})


@pytest.mark.parametrize("method", ["metagpt", "metagpt_ties", "metagpt_dare", "metagpt_dare_ties"])
def test_strided_inputs_are_merged_and_never_modified(method):
    """Transposed (non-contiguous) inputs, as in mergekit's own regression test: the
    merge equals the merge of contiguous copies, and no input changes."""
    sds = _models()
    strided = {k: {n: t.t().contiguous().t() if t.dim() == 2 else t for n, t in sd.items()} for k, sd in sds.items()}
    assert any(not t.is_contiguous() for t in strided["a"].values())
    before = {k: {n: t.clone() for n, t in sd.items()} for k, sd in strided.items()}
    params = {} if method == "metagpt" else {"density": 1.0}
    torch.manual_seed(0)
    merged = merge_state_dicts(strided, method, base="base", parameters=params)
    torch.manual_seed(0)
    reference = merge_state_dicts(sds, method, base="base", parameters=params)
    for name, ref in reference.items():
        assert merged[name].shape == ref.shape
        assert torch.allclose(merged[name], ref, atol=1e-6), name
    for k, sd in strided.items():
        assert all(torch.equal(sd[n], before[k][n]) for n in sd), k


def test_repeated_calls_with_same_ids_get_their_own_norms():
    first, second = _models(0), _models(0)
    second["a"] = perturbed(second["base"], 0.5, 9)  # same id, other weights
    merge_state_dicts(first, "metagpt", base="base")
    merged = merge_state_dicts(second, "metagpt", base="base")
    _, reference = closed_form(second["base"], [second[k] for k in "abc"])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_merge_tensors_on_one_tensor():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])
    out = merge_tensors([base, a, b], "metagpt", base_index=0)
    # ||a||²=1, ||b||²=4 → λ = 0.2, 0.8
    assert torch.allclose(out, torch.tensor([0.2, 1.6, 0, 0]))


def test_all_zero_task_vectors_return_base_with_warning(caplog):
    base = random_state_dict(0)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    merged = merge_state_dicts({"base": base, "x": dict(base), "y": dict(base)}, "metagpt", base="base")
    for name in base:
        assert torch.equal(merged[name], base[name])
    assert any("every task vector is zero" in r.getMessage() for r in caplog.records)


def test_in_memory_lambda_parameter():
    sds = _models()
    merged = merge_state_dicts(sds, "metagpt", base="base", parameters={"lambda": 0.3})
    _, reference = closed_form(sds["base"], [sds[k] for k in "abc"], scale=0.3)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5


def test_nan_in_memory_names_model_and_tensor():
    sds = _models()
    sds["b"]["model.norm.weight"] = sds["b"]["model.norm.weight"].clone()
    sds["b"]["model.norm.weight"][3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*model b"):
        merge_state_dicts(sds, "metagpt", base="base")


# -- granularity given per group (mergekit's PerGroupValues) ---------------------------
def _tiny_models():
    """Three tensors; each model's task vector is large on some tensors, tiny on others,
    so global and per-tensor λ differ clearly."""
    g = torch.Generator().manual_seed(7)
    base = {n: torch.randn(40, generator=g, dtype=torch.float64) for n in ("x", "y", "z")}
    scales = {"a": {"x": 0.3, "y": 0.002, "z": 0.05}, "c": {"x": 0.002, "y": 0.2, "z": 0.01}}
    models = {m: {n: base[n] + s[n] * torch.randn(40, generator=g, dtype=torch.float64) for n in base}
              for m, s in scales.items()}
    return base, models


def _closed_form_lambdas(base, models, granularity):
    """λ of each model on each tensor: ‖δ_t‖² / Σ_k ‖δ_k‖², over all tensors (global) or
    over the tensor alone (per_tensor)."""
    sq = {m: {n: float((sd[n] - base[n]).pow(2).sum()) for n in base} for m, sd in models.items()}
    overall = {m: sum(v.values()) for m, v in sq.items()}
    out = {}
    for n, gran in zip(base, granularity):
        own = {m: sq[m][n] for m in models} if gran == "per_tensor" else overall
        out[n] = {m: own[m] / sum(own.values()) for m in models}
    return out


@pytest.mark.parametrize("granularity", [
    ("global", "global", "global"),
    ("per_tensor", "per_tensor", "per_tensor"),
    ("global", "per_tensor", "global"),
    ("per_tensor", "global", "per_tensor"),
])
def test_per_group_granularity_matches_closed_form(granularity):
    from mergekit.merge_methods.base import PerGroupValues

    base, models = _tiny_models()
    merged = merge_state_dicts({"base": base, **models}, "metagpt", base="base",
                               parameters={"granularity": PerGroupValues(list(granularity))})
    lambdas = _closed_form_lambdas(base, models, granularity)
    for n in base:
        expected = base[n] + sum(lambdas[n][m] * (models[m][n] - base[n]) for m in models)
        assert torch.allclose(merged[n], expected, rtol=0, atol=1e-6), (n, granularity)
    # the λ really differ between the two readings on every tensor
    other = _closed_form_lambdas(base, models, ["per_tensor" if g == "global" else "global"
                                                for g in granularity])
    assert all(abs(lambdas[n]["a"] - other[n]["a"]) > 0.05 for n in base)


def test_per_group_alpha_must_still_be_one_value_with_mixed_granularity():
    from mergekit.merge_methods.base import PerGroupValues

    base, models = _tiny_models()
    with pytest.raises(ValueError, match="alpha must be one value"):
        merge_state_dicts({"base": base, **models}, "metagpt", base="base", parameters={
            "granularity": PerGroupValues(["global", "per_tensor", "global"]),
            "alpha": PerGroupValues([1.0, 0.5, 1.0]),
        })


def test_a_bad_value_in_memory_is_named_with_its_parameter_model_and_tensor():
    """mergekit's binding of in-memory parameters raises pydantic's message alone (the value,
    not the parameter of a Literal, nor the model or the tensor group): named."""
    from mergekit.merge_methods.base import PerGroupValues

    base, models = _tiny_models()
    sds = {"base": base, **models}
    cases = [
        ({"density": {"a": 0.5, "c": 0}}, r"^MetaGPT: parameter density must be a number in \(0, 1\] "
                                          r"\(model c, tensor 'x'; got 0\)$"),
        ({"density": [0.5, 1.5]}, r"\(model c, tensor 'x'; got 1\.5\)$"),
        ({"density": PerGroupValues([0.5, 0.5, 2.0])}, r"must be a number in \(0, 1\] \(tensor 'z'; got 2\.0\)$"),
        ({"lambda_from": "bogus"}, r"^MetaGPT: parameter lambda_from: .*'dense' or 'sparse' \(tensor 'x'; got 'bogus'\)$"),
    ]
    for parameters, expected in cases:
        with pytest.raises(MetaGPTError, match=expected):
            merge_state_dicts(sds, "metagpt_ties", base="base", parameters=parameters)
    # one value per model besides the base: a list of another length is mergekit's to say
    # (its length), not a value of the wrong model
    with pytest.raises(ValueError, match="expects 2 values; got 3"):
        merge_state_dicts(sds, "metagpt_ties", base="base", parameters={"density": [2, 0.5, 0.5]})


def test_per_group_lambda_from_must_be_one_value():
    """Dense norms for some groups and sparsified ones for the others would give λ of
    neither; one value (either) merges."""
    from mergekit.merge_methods.base import PerGroupValues

    base, models = _tiny_models()
    sds = {"base": base, **models}
    with pytest.raises(ValueError, match="lambda_from must be one value .*got dense, sparse"):
        merge_state_dicts(sds, "metagpt_ties", base="base", parameters={
            "density": 0.5, "lambda_from": PerGroupValues(["sparse", "dense", "sparse"])})
    merge_state_dicts(sds, "metagpt_ties", base="base", parameters={
        "density": 0.5, "lambda_from": PerGroupValues(["sparse"] * 3)})


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_norms_are_those_of_the_tensors_cast_to_the_merge_dtype(granularity):
    """merge_state_dicts(dtype=…) casts every tensor before merging: the norms are those of
    the cast tensors, as in a graph merge with `dtype:`. Model a moves 0.003 where the base
    is 1 (bfloat16 rounds that away: its cast task vector is zero), model b 0.003 where the
    base is 0 (kept): cast, λ_b = 1; from the float32 inputs, λ_a = λ_b = 1/2. `z` holds
    both in one tensor, for per-tensor λ."""
    base = {"x": torch.ones(64), "y": torch.zeros(64)}
    a = {"x": torch.full((64,), 1.003), "y": torch.zeros(64)}
    b = {"x": torch.ones(64), "y": torch.full((64,), 0.003)}
    for sd in (base, a, b):
        sd["z"] = torch.cat([sd["x"], sd["y"]])
    merged = merge_state_dicts({"base": base, "a": a, "b": b}, "metagpt", base="base",
                               dtype=torch.bfloat16, out_dtype=torch.float32,
                               parameters={"granularity": granularity})
    expected = torch.full((64,), 0.003).to(torch.bfloat16).float()  # λ_b = 1
    assert torch.equal(merged["y"], expected), merged["y"][:4]
    assert torch.equal(merged["x"], torch.ones(64))
    assert torch.equal(merged["z"], torch.cat([torch.ones(64), expected])), merged["z"][60:68]


def test_views_of_one_fused_tensor_each_count():
    """q, k and v as chunk(3) views of one fused tensor in every state dict: three tensors,
    each in the norms (not one, as views of one storage that tied weights would be)."""
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(24, 8, generator=gen)
    sds = {"base": dict(zip("qkv", fused.chunk(3)))}
    for name, scales in (("m0", (0.1, 0.01, 0.01)), ("m1", (0.01, 0.01, 0.1))):
        noise = torch.cat([torch.randn(8, 8, generator=gen) * s for s in scales])
        sds[name] = dict(zip("qkv", (fused + noise).chunk(3)))
    assert sds["m0"]["k"].storage_offset() == 64  # views of one storage
    lams, reference = closed_form(sds["base"], [sds["m0"], sds["m1"]])
    merged = merge_state_dicts(sds, "metagpt", base="base")
    only_q, _ = closed_form({"q": sds["base"]["q"]}, [{"q": sds[m]["q"]} for m in ("m0", "m1")])
    assert abs(only_q[0] - lams[0]) > 0.1  # counting one view would show
    for name, ref in reference.items():
        torch.testing.assert_close(merged[name].double(), ref, atol=1e-6, rtol=1e-6)


def test_an_in_memory_merge_without_a_base_says_metagpt_needs_one():
    base, models = _tiny_models()
    with pytest.raises(MetaGPTError, match="MetaGPT needs a base_model"):
        merge_state_dicts({"base": base, **models}, "metagpt")


def _tiny_vectors(scale, seed=0):
    """Weights of 1000 × `scale`, so that float32 keeps the task vectors of `scale` (most of
    them: weights of 1e-20 would round away nearly all of a 1e-30 noise)."""
    gen = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(64, 64, generator=gen) * scale * 1e3 for name in ("w", "v")}
    models = {f"m{i}": {name: t + torch.randn(64, 64, generator=gen) * s for name, t in base.items()}
              for i, s in enumerate([scale, 3 * scale])}
    return base, models


@pytest.mark.parametrize("scale", [1e-23, 1e-30], ids=["squares-subnormal", "squares-vanish"])
def test_task_vectors_too_small_for_float32_squares_get_their_exact_lambdas_in_memory(scale, caplog):
    """|δ| ~ 1e-23 (float32 squares subnormal: λ 0.013 where the closed form gives 0.101) or
    1e-30 (squares 0: "every task vector is zero", the base written; every element differs): in memory the tensors are
    at hand, so such norms are summed again in float64: the closed form's λ, and no warning."""
    base, models = _tiny_vectors(scale)
    assert all((models[m][n] != base[n]).float().mean() > 0.9 for m in models for n in base)
    caplog.set_level(logging.INFO, logger="mergekit_metagpt")
    merged = merge_state_dicts({"base": base, **models}, "metagpt", base="base")
    lams, reference = closed_form(base, list(models.values()))
    table = next(r.getMessage() for r in caplog.records if "MetaGPT coefficients" in r.getMessage())
    shown = [float(line.split()[-1]) for line in table.splitlines() if re.match(r"m\d ", line)]
    assert shown == pytest.approx(lams, abs=2e-6), (shown, lams)
    for name, ref in reference.items():  # δ of 1e-23 on weights of 1e-20: seen in float32
        assert torch.allclose(merged[name].double(), ref, rtol=1e-6, atol=0), name
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_groups_of_one_name_each_count_in_a_direct_call():
    """A method called directly with tensor groups (its documented ``__call__``) may be
    given two groups of one name: each counts in the norms, as in any other merge."""
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    base = {"w1": torch.zeros(4), "w2": torch.zeros(3)}
    a = {"w1": torch.tensor([3.0, 0, 0, 0]), "w2": torch.zeros(3)}  # ‖δ_a‖² = 9
    b = {"w1": torch.zeros(4), "w2": torch.tensor([0, 1.0, 0])}  # ‖δ_b‖² = 1
    groups = tuple(
        TensorGroup.from_tensors([base[n], a[n], b[n]], ids=["base", "a", "b"], base_index=0, name="w")
        for n in ("w1", "w2")
    )
    first, second = merge_methods.get("metagpt")(groups)
    assert torch.allclose(first, torch.tensor([2.7, 0, 0, 0]))  # λ_a = 0.9
    assert torch.allclose(second, torch.tensor([0, 0.1, 0]))  # λ_b = 0.1


def test_an_unknown_parameter_in_memory_is_refused_with_why(tmp_path):
    """merge_state_dicts(parameters={"weight": ...}) (a task_arithmetic habit) is refused as a
    recipe's `weight` is: the λ are computed, and bake is how to set weights by hand
    (mergekit's own TypeError names only the parameter)."""
    from mergekit.merge_methods import merge_state_dicts

    base = random_state_dict(3)
    models = {"base": base, "a": perturbed(base, 0.01, 1), "b": perturbed(base, 0.05, 2)}
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) for metagpt: weight \(it takes: alpha, "
                                         r"granularity, lambda\)\. MetaGPT computes each model's weight \(λ\) "
                                         r"from the task-vector norms \(logged at INFO\); to set weights by hand, "
                                         r"merge with task_arithmetic and those λ as weights$"):
        merge_state_dicts(models, "metagpt", base="base", parameters={"weight": {"a": 0.5, "b": 0.5}})
    with pytest.raises(ValueError, match=r"for metagpt_ties: rescale .*which metagpt_dare and metagpt_dare_ties do"):
        merge_state_dicts(models, "metagpt_ties", base="base", parameters={"rescale": True, "density": 0.5})


@pytest.mark.parametrize("method, parameters, out_dtype, causes", [
    ("metagpt", {"lambda": 3.0}, None, "lambda 3"),  # the float32 sum, cast back to float16
    ("metagpt_ties", {"lambda": 3.0, "density": 1.0}, None, "lambda 3, mergekit's ties arithmetic in float16"),
    ("metagpt", {}, torch.float16, "out_dtype float16 of wider merged values"),  # float32 inputs
])
def test_a_float16_output_that_overflows_is_refused_naming_the_tensor(method, parameters, out_dtype, causes):
    """Finite inputs whose merge exceeds float16's ±65504 are refused, not written as Inf."""
    dtype = torch.float32 if out_dtype is not None else torch.float16
    big = 8e4 if out_dtype is not None else 3e4
    base = {"w": torch.full((4, 4), big, dtype=dtype), "v": torch.ones(3, dtype=dtype)}
    model = {"w": base["w"] + 2e4, "v": base["v"] + 1}
    with pytest.raises(MetaGPTError, match=re.escape(f"the merge of tensor 'w' overflows float16: 16 values "
                                                     f"beyond ±65504 ({causes}); merge and write in float32")):
        merge_state_dicts({"base": base, "m": model}, method, base="base", parameters=parameters,
                          out_dtype=out_dtype)
    ok = merge_state_dicts({"base": base, "m": model}, method, base="base",
                           parameters={**parameters, "lambda": 1.0}, out_dtype=out_dtype and torch.float32)
    assert torch.isfinite(ok["w"]).all()


@pytest.mark.parametrize("head_density, counted", [(0.2, [0, 2]), (0.05, [0, 1, 2])])
def test_tied_groups_sparsified_apart_count_apart(head_density, counted):
    """nn.Module inputs with tied embed/head: the two groups count once where they merge to
    one tensor, but with a density of their own (lambda_from: sparse) each sparsifies its
    task vector otherwise, the merged tensors differ, and each counts."""
    from mergekit.merge_methods.base import PerGroupValues, TensorGroup

    from mergekit_metagpt.method import MetaGPTMerge
    from mergekit_metagpt.norms import in_memory_norms

    torch.manual_seed(0)

    def module(base=None, scale=0.0):
        m = torch.nn.Module()
        m.embed = torch.nn.Embedding(16, 8)
        m.head = torch.nn.Linear(8, 16, bias=False)
        m.head.weight = m.embed.weight  # tied
        m.mlp = torch.nn.Linear(8, 8, bias=False)
        if base is not None:
            with torch.no_grad():
                for p, q in zip(m.parameters(), base.parameters()):
                    p.copy_(q + scale * torch.randn_like(q))
        return m

    base = module()
    modules = {"base": base, "a": module(base, 0.3), "b": module(base, 0.1)}
    names = list(base.state_dict())
    assert names == ["embed.weight", "head.weight", "mlp.weight"]
    density = {"embed.weight": 0.2, "head.weight": head_density, "mlp.weight": 1.0}
    with torch.no_grad():
        merged = merge_state_dicts(modules, "metagpt_ties", base="base", parameters={
            "lambda_from": "sparse", "density": PerGroupValues([density[n] for n in names])})
    assert torch.equal(merged["embed.weight"], merged["head.weight"]) == (head_density == 0.2)
    sds = {k: m.state_dict(keep_vars=True) for k, m in modules.items()}
    groups = [TensorGroup.from_tensors([sds[k][n] for k in sds], ids=list(sds), base_index=0, name=n) for n in names]
    method = MetaGPTMerge("metagpt_ties")
    norms = in_memory_norms(groups, lambda i: method.sparsifier(
        {"lambda_from": "sparse", "density": {m: density[names[i]] for m in "ab"}}))
    assert {m: sorted(v) for m, v in norms.items()} == {"a": counted, "b": counted}


def _small(seed=5):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1000, generator=gen)
    return {"base": {"w": base}, **{m: {"w": base + s * torch.randn(1000, generator=gen)}
                                    for m, s in (("a", 0.01), ("b", 0.03), ("c", 0.002))}}


def _closed(sds):
    base = sds["base"]["w"].double()
    norms = {m: float((sd["w"].double() - base).pow(2).sum()) for m, sd in sds.items() if m != "base"}
    lams = {m: v / sum(norms.values()) for m, v in norms.items()}
    return lams, base + sum(lams[m] * (sds[m]["w"].double() - base) for m in lams)


def test_a_merge_in_inference_mode_leaves_the_next_one_outside_it_working():
    """The per-thread work buffers made under torch.inference_mode() cannot be written
    outside it: the next merge of the thread, outside, was a RuntimeError ('Inplace update
    to inference tensor outside InferenceMode'), until the buffers were released."""
    sds = _small()
    _, reference = _closed(sds)
    with torch.inference_mode():
        first = merge_state_dicts(sds, "metagpt", base="base")["w"]
    second = merge_state_dicts(sds, "metagpt", base="base")["w"]
    for merged in (first, second):
        assert (merged.double() - reference).abs().max().item() < 1e-6


def test_a_merge_differentiated_through_leaves_no_graph_to_the_next_merge():
    """Inputs that require grad, autograd on: the merge is differentiable (each model's
    gradient is its λ, the base's 1 − Σλ), and the next merge of plain tensors in the
    thread returns plain tensors (the reused work buffers took the first call's graph: its
    output required grad, its backward wrote into the first call's inputs, which the
    buffers kept alive until then)."""
    sds = _small()
    lams, reference = _closed(sds)
    wanting = {m: {"w": sd["w"].clone().requires_grad_(True)} for m, sd in sds.items()}
    first = merge_state_dicts(wanting, "metagpt", base="base")["w"]
    assert (first.detach().double() - reference).abs().max().item() < 1e-6
    first.sum().backward()
    for m, lam in lams.items():
        assert torch.allclose(wanting[m]["w"].grad, torch.full((1000,), lam), atol=1e-6), m
    assert torch.allclose(wanting["base"]["w"].grad, torch.full((1000,), 1 - sum(lams.values())), atol=1e-6)
    import gc
    import weakref

    held = [weakref.ref(sd["w"]) for sd in wanting.values()]
    del first, wanting
    gc.collect()
    assert not [ref for ref in held if ref() is not None]  # no graph kept them in the thread's buffers
    second = merge_state_dicts(sds, "metagpt", base="base")["w"]
    assert not second.requires_grad and second.grad_fn is None
    assert (second.double() - reference).abs().max().item() < 1e-6


def test_a_lone_model_in_memory_is_warned_of_and_a_one_tensor_merge_logs_at_debug(caplog):
    """A state dict merge of one model besides the base is stock task arithmetic (ties, for
    metagpt_ties), said as for a recipe. A merge_tensors call (one group, perhaps one of a
    loop over a model's tensors) takes λ from that tensor alone: its table is logged at
    DEBUG, naming the tensor, and a model equal to the base there, or a lone model, is not
    warned of once per tensor."""
    sds = _models()
    caplog.set_level(logging.DEBUG, logger="mergekit_metagpt")
    merge_state_dicts({"base": sds["base"], "a": sds["a"]}, "metagpt", base="base")
    assert "MetaGPT: only one model besides the base (a): its λ is 1, so this merge is stock task_arithmetic" \
        in caplog.text, caplog.text
    caplog.clear()
    merge_state_dicts({"base": sds["base"], "a": sds["a"]}, "metagpt_ties", base="base",
                      parameters={"density": 1.0})
    assert "so this merge is stock ties with weight 1" in caplog.text, caplog.text
    caplog.clear()
    merge_state_dicts({k: sds[k] for k in ("base", "a", "b")}, "metagpt", base="base")
    assert "only one model" not in caplog.text
    caplog.clear()
    base, a = torch.zeros(4), torch.tensor([1.0, 0, 0, 0])
    out = merge_tensors([base, base.clone(), a], "metagpt", ids=["base", "twin", "a"], base_index=0, name="w")
    assert torch.equal(out, a)  # λ_twin 0, λ_a 1
    table = [r for r in caplog.records if "MetaGPT coefficients of tensor 'w'" in r.getMessage()]
    assert len(table) == 1 and table[0].levelno == logging.DEBUG, caplog.text
    assert re.search(r"^twin +0\.000000e\+00 +0\.000000$", table[0].getMessage(), re.M), caplog.text
    merge_tensors([base, a], "metagpt", ids=["base", "a"], base_index=0)
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG], caplog.text


def test_groups_of_different_bases_in_one_call_are_refused_naming_both():
    """λ weigh task vectors from one base: a direct call whose groups have different bases
    would mix them, and is refused before anything is merged."""
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    groups = tuple(
        TensorGroup.from_tensors([torch.zeros(3), torch.ones(3), 2 * torch.ones(3)], ids=[b, "a", "c"],
                                 base_index=0, name=name)
        for b, name in (("base1", "w1"), ("base2", "w2"))
    )
    with pytest.raises(MetaGPTError, match=r"different base models \('base1' for 'w1', 'base2' for 'w2'\)"):
        merge_methods.get("metagpt")(groups)
    # per_tensor groups take their own tensor's λ: nothing mixes (λ_a 0.2, λ_c 0.8 in each)
    first, second = merge_methods.get("metagpt")(groups, parameters={"granularity": "per_tensor"})
    assert torch.allclose(first, torch.full((3,), 1.8)) and torch.allclose(second, torch.full((3,), 1.8))


def test_a_model_of_any_id_is_not_taken_for_the_base():
    """The base's own check values are kept under a key of the plugin's; a model id that looks
    like it (the tuple it once was) is a model like any other."""
    sds = _models()
    odd = ("__metagpt_base__",)
    merged = merge_state_dicts({"base": sds["base"], odd: sds["a"], "b": sds["b"]}, "metagpt", base="base")
    _, reference = closed_form(sds["base"], [sds["a"], sds["b"]])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_a_second_float64_pass_leaves_the_generator_as_one_pass_does(monkeypatch):
    """A model equal to the base (‖δ‖² 0, under EXACT_BELOW) has its norms summed again in
    float64; with DARE's random sparsification that pass draws masks too. It draws them from a
    forked generator: the caller's moves on as after one pass, so a seeded merge's own masks
    do not depend on whether some model was summed again."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.sparsify import SparsificationMethod

    from mergekit_metagpt import norms

    sds = _models()
    names = list(sds["base"])[:4]
    groups = [TensorGroup.from_tensors([sds["base"][n], sds["base"][n].clone(), sds["a"][n]],
                                       ids=["base", "twin", "a"], base_index=0, name=n) for n in names]
    sparsifier = norms.Sparsifier(SparsificationMethod.random, True, {"twin": 0.5, "a": 0.5})

    def state_after(exact_below):
        monkeypatch.setattr(norms, "EXACT_BELOW", exact_below)
        torch.manual_seed(0)
        found = norms.in_memory_norms(groups, lambda _i: sparsifier)
        return found, torch.random.get_rng_state()

    (found, after_two), (_, after_one) = state_after(1e-17), state_after(0.0)
    assert norms.total(found["twin"]) == 0.0 and norms.total(found["a"]) > 0
    assert torch.equal(after_two, after_one)
