"""The streaming pre-pass: once per merge, never stale, thread-safe, shape checks."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import mergekit_metagpt  # noqa: F401
from checkpoints import closed_form, perturbed, random_state_dict, save_checkpoint
from merging import recipe, run_recipe
from mergekit_metagpt import prepass
from mergekit_metagpt.errors import MetaGPTError

MODELS = ("model0", "model1", "model2")


def test_prepass_runs_exactly_once_per_merge(llama_family, merge_options, tmp_path, monkeypatch):
    paths, sds = llama_family
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")  # no memo: a second pre-pass would read again
    prepass.clear_memo()
    from mergekit_metagpt import plan_inputs

    resolved = []  # each planned task's reads are resolved once, for the plan's checks and the pre-pass
    real_task_reads = plan_inputs.task_reads
    monkeypatch.setattr(plan_inputs, "task_reads", lambda task: resolved.append(task) or real_task_reads(task))
    runs, read = prepass.STATS.runs, prepass.STATS.tensors_read
    run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)
    assert prepass.STATS.runs == runs + 1
    # every tensor of the base and of each of the three models read once
    assert prepass.STATS.tensors_read - read == 4 * len(sds["base"])
    assert len(resolved) == len(sds["base"]) and len({id(task) for task in resolved}) == len(resolved)


@pytest.mark.parametrize("first_shards, second_shards", [(None, None), (None, "24KB"), ("24KB", None)],
                         ids=["same-file", "then-sharded", "then-one-file"])
def test_checkpoints_rewritten_between_merges_in_one_process_are_read_as_they_are(
        first_shards, second_shards, tmp_path, merge_options):
    """mergekit 0.1.5 keeps one loader per model for the whole process (LoaderCache), with
    the index of its files and its last shard open: a pipeline that rewrites a checkpoint
    between two run_merge calls got λ and weights partly of the old files (the old
    handle's tensors), and those norms were cached under the new files' key; with the
    sharding changed, an error blaming a missing file. A MetaGPT merge opens its models
    afresh."""
    base = random_state_dict(1)
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base, shard_size=None)}
    first = {f"m{i}": perturbed(base, s, i) for i, s in enumerate((0.01, 0.1))}
    for name, sd in first.items():
        paths[name] = save_checkpoint(str(tmp_path / name), sd, shard_size=first_shards)
    run_recipe(recipe(paths, ["m0", "m1"]), str(tmp_path / "out1"), merge_options)

    # same paths (same ModelReferences), other weights: the scales swap
    second = {f"m{i}": perturbed(base, s, 10 + i) for i, s in enumerate((0.1, 0.01))}
    for name, sd in second.items():
        if first_shards and not second_shards:  # transformers would leave the old index behind
            shutil.rmtree(tmp_path / name)
        save_checkpoint(str(tmp_path / name), sd, shard_size=second_shards)
    merged = run_recipe(recipe(paths, ["m0", "m1"]), str(tmp_path / "out2"), merge_options)
    lams, reference = closed_form(base, [second["m0"], second["m1"]])
    assert lams[0] > 0.9
    record = json.loads((tmp_path / "out2" / "metagpt_coefficients.json").read_text())
    assert [row["lambda"] for row in record["merges"][0]["models"]] == pytest.approx(lams, rel=1e-6)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_an_unchanged_checkpoint_keeps_its_loader_and_a_merge_meanwhile_always_finds_one(tmp_path):
    """A MetaGPT merge replaces mergekit's loader of a model only when its files changed
    (a new loader of a hub model asks the hub again), and in one assignment: another
    merge of the process, in another thread and of any method, looking the loader up
    meanwhile, always finds one (a pop, then a new loader, left a gap: KeyError)."""
    import time

    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    from mergekit_metagpt.planning import open_loaders

    base = random_state_dict(1)
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base, shard_size=None),
             "m0": save_checkpoint(str(tmp_path / "m0"), perturbed(base, 0.01, 0), shard_size=None)}
    config = MergeConfiguration.model_validate(recipe(paths, ["m0"]))
    options = MergeOptions(quiet=True)
    model = next(m for m in config.referenced_models() if str(m) == paths["m0"])
    open_loaders(config, options)
    first = LoaderCache.loaders[model]
    open_loaders(config, options)
    assert LoaderCache.loaders[model] is first  # unchanged files: the same loader

    failures, stop = [], threading.Event()

    def other_merge():  # what mergekit's LoadTensor does for each tensor
        while not stop.is_set():
            try:
                LoaderCache().get(model)
            except Exception as error:  # noqa: BLE001
                failures.append(error)

    thread = threading.Thread(target=other_merge)
    thread.start()
    try:
        shard = os.path.join(paths["m0"], "model.safetensors")
        seen = {id(first)}
        for step in range(40):  # each time "rewritten": another mtime, another loader
            os.utime(shard, ns=(time.time_ns(), time.time_ns() + step * 10**9))
            open_loaders(config, options)
            seen.add(id(LoaderCache.loaders[model]))
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:3]
    assert len(seen) > 1  # replaced when the files changed


def test_a_loader_is_replaced_when_only_its_index_or_its_options_changed(tmp_path):
    """The index rewritten alone (same shards: it may map lm_head elsewhere), or another
    merge option of mergekit's loaders (--lazy-unpickle …): a new loader."""

    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    from mergekit_metagpt.planning import open_loaders

    base = random_state_dict(1)
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base),
             "m0": save_checkpoint(str(tmp_path / "m0"), perturbed(base, 0.01, 0))}
    config = MergeConfiguration.model_validate(recipe(paths, ["m0"]))
    model = next(m for m in config.referenced_models() if str(m) == paths["m0"])
    open_loaders(config, MergeOptions(quiet=True))
    first = LoaderCache.loaders[model]
    index = os.path.join(paths["m0"], "model.safetensors.index.json")
    data = json.loads(open(index).read())
    with open(index + ".new", "w") as f:
        json.dump(data, f, indent=4)  # the same map, another file
    os.replace(index + ".new", index)
    open_loaders(config, MergeOptions(quiet=True))
    second = LoaderCache.loaders[model]
    assert second is not first
    open_loaders(config, MergeOptions(quiet=True, lazy_unpickle=True))
    assert LoaderCache.loaders[model] is not second and LoaderCache.loaders[model].lazy_unpickle


def _planned(paths, models):
    """A recipe planned by mergekit's own planner and made one task universe (as the
    executor does), so that its MetaGPT tasks know their MergeRun."""
    from mergekit.config import MergeConfiguration
    from mergekit.graph import TaskUniverse
    from mergekit.options import MergeOptions

    from mergekit_metagpt import merge_plan
    from mergekit_metagpt.planning import plan_recipe

    config = MergeConfiguration.model_validate(recipe(paths, models))
    tasks = [t for s in plan_recipe(config, MergeOptions(quiet=True)).sets.values() for t in s.tasks]
    universe = TaskUniverse(tasks)
    mine = merge_plan.ours(universe.tasks)
    run = merge_plan.run_for_task(mine[0])
    assert run is not None and all(merge_plan.run_for_task(t) is run for t in mine)
    return run, mine


def _inputs(task):
    gather = task.gather_tensors
    return gather.execute(**{key: leaf.execute() for key, leaf in gather.arguments().items()})


def test_concurrent_tasks_of_one_merge_share_one_prepass(llama_family, monkeypatch):
    """Eight threads execute eight tensors of one plan at once (as mergekit's multi-GPU
    executor may): one pre-pass, whose λ every tensor uses, matching the closed form."""
    paths, sds = llama_family
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")  # no memo: a second pre-pass would read again
    prepass.clear_memo()
    run, tasks = _planned(paths, MODELS)
    chosen = tasks[:8]
    inputs = [_inputs(t) for t in chosen]  # read before the barrier: only the merges race
    runs, read = prepass.STATS.runs, prepass.STATS.tensors_read
    results, errors = {}, []
    barrier = threading.Barrier(len(chosen))

    def worker(index):
        try:
            barrier.wait()
            results[index] = chosen[index].execute(tensors=inputs[index])
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(chosen))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == len(chosen)
    assert prepass.STATS.runs == runs + 1
    assert prepass.STATS.tensors_read - read == 4 * len(sds["base"])
    (set_norms,) = run.result.sets
    lams, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    got = set_norms.coefficients.lambdas
    for model, lam in zip(MODELS, lams):
        assert abs(got[next(k for k in got if str(k) == paths[model])] - lam) < 1e-6
    for index, task in enumerate(chosen):
        name = task.output_weight.name
        assert (results[index].double() - reference[name]).abs().max().item() < 1e-5, name


def test_concurrent_callers_of_run_norms_get_one_result(llama_family, monkeypatch):
    paths, sds = llama_family
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    prepass.clear_memo()
    run, _ = _planned(paths, MODELS)
    runs = prepass.STATS.runs
    results, errors = [], []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            results.append(prepass.run_norms(run, torch.device("cpu")))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 8
    assert prepass.STATS.runs == runs + 1
    assert all(r is results[0] for r in results)
    (set_norms,) = results[0].sets
    norms = dict(set_norms.coefficients.squared_norms)
    expected = sum(float((sds["model2"][k].double() - sds["base"][k].double()).pow(2).sum()) for k in sds["base"])
    got = next(v for k, v in norms.items() if str(k) == paths["model2"])
    assert abs(got - expected) / expected < 1e-5


@pytest.mark.parametrize("failing_step", ["compute", "_announce"])
def test_a_failed_prepass_is_not_run_again_by_other_callers(failing_step, llama_family, monkeypatch):
    """Under --multi-gpu every worker thread waits on the run: after the first caller's
    pre-pass fails, the others get its error at once instead of reading the model again;
    also where computing the norms went well but logging them or writing the record
    failed (no λ of a merge that has no record)."""
    paths, _ = llama_family
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    run, _ = _planned(paths, MODELS)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise MetaGPTError(f"MetaGPT: {failing_step} failed")

    monkeypatch.setattr(prepass, failing_step, failing)
    for _ in range(3):
        with pytest.raises(MetaGPTError, match=f"{failing_step} failed"):
            prepass.run_norms(run, torch.device("cpu"))
    assert len(calls) == 1 and run.result is None


def test_coefficients_are_computed_once_per_merge_set(llama_family, merge_options, tmp_path, monkeypatch):
    """Every output tensor asks for its λ: they are summed once per merge set, not once
    per tensor (which made a merge quadratic in its number of tensors)."""
    from mergekit_metagpt.coefficients import Coefficients

    paths, sds = llama_family
    calls = []
    original = Coefficients.from_norms.__func__
    monkeypatch.setattr(Coefficients, "from_norms", classmethod(lambda cls, *a: calls.append(1) or original(cls, *a)))
    run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)
    assert len(sds["base"]) > 10
    assert len(calls) <= 2, len(calls)


@pytest.mark.parametrize("method, parameters", [
    ("metagpt", None),
    ("metagpt_ties", {"lambda_from": "sparse"}),
])
def test_resized_vocabulary_without_alignment_is_refused_before_any_weight(method, parameters, tmp_path,
                                                                         merge_options, capsys):
    """A model with 72 token rows against a base with 64 and no tokenizer_source: mergekit
    refuses to merge tensors of different shapes (its own check, before that tensor's
    merge, may come first), and nothing is written; where no merge runs
    (`mergekit-metagpt coefficients`), the pre-pass refuses, naming the model, the tensor
    and how to align them, instead of printing λ. With tokenizer_source the same models
    merge (their norms: tests/test_plan_reads.py)."""

    from merging import write_yaml
    from mergekit_metagpt.cli import main
    from mergekit_metagpt.synthetic import write_tokenizer

    base = random_state_dict(2)
    resized = {k: v + 0.01 for k, v in base.items()}
    extra = random_state_dict(5, vocab_size=72)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        resized[name] = torch.cat([resized[name], extra[name][64:]])
    other = perturbed(base, 0.02, 7)
    paths = {
        "base": save_checkpoint(str(tmp_path / "base"), base),
        "resized": save_checkpoint(str(tmp_path / "resized"), resized, vocab_size=72),
        "other": save_checkpoint(str(tmp_path / "other"), other),
    }
    for name, vocab in (("base", 64), ("resized", 72), ("other", 64)):
        write_tokenizer(paths[name], vocab)
    config = recipe(paths, ["resized", "other"], method=method, parameters=parameters)
    assert main(["coefficients", write_yaml(config, str(tmp_path / "r.yml"))]) == 1
    message = capsys.readouterr().err
    assert re.search(r"shape mismatch for tensor '(model\.embed_tokens|lm_head)\.weight': model "
                     + re.escape(paths["resized"]) + r" has \(72, 32\), base model .* has \(64, 32\)", message), message
    assert "set tokenizer_source" in message
    out = str(tmp_path / "out")
    with pytest.raises((MetaGPTError, ValueError), match="(shape|size) mismatch"):
        run_recipe(config, out, merge_options)
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]
    run_recipe(dict(config, tokenizer_source="base"), str(tmp_path / "aligned"), merge_options)


@pytest.mark.parametrize("config_vocab", [64, 66], ids=["at its vocab_size", "past its rows"])
def test_a_tokenizer_past_its_models_rows_is_named_not_a_key_or_index_error(config_vocab, tmp_path, merge_options,
                                                                             capsys):
    """A fine-tune (d, 64 rows) whose tokenizer has a token (w64) at id 64, which another
    fine-tune (a, 65 rows) has a row for, under `tokenizer_source: union`. With d's
    config's vocab_size 64, mergekit 0.1.5 leaves the token out of d's token map and its
    alignment fails with a bare `KeyError: 64`; with a vocab_size of 66, which mergekit
    takes as it is (as it takes the tokenizer's size where it reads none: a Qwen2.5-VL
    config saved by transformers 5), the token stays in d's map at a row past its
    embeddings', and the alignment fails with a bare `IndexError`. A MetaGPT merge and
    `coefficients` name the model and the token (and the tensor) instead, before any
    weights are written; another method's merge keeps mergekit's own error (the plugin
    changes none of it). A recipe forcing w64's embedding from a reads no row of d's for
    it, and merges."""
    import json

    from merging import safetensors_in, write_yaml
    from mergekit_metagpt.cli import main
    from mergekit_metagpt.synthetic import write_tokenizer

    base = random_state_dict(4)
    grown = perturbed(random_state_dict(4, vocab_size=65), 0.01, 5)
    paths = {
        "base": save_checkpoint(str(tmp_path / "base"), base),
        "a": save_checkpoint(str(tmp_path / "a"), grown, vocab_size=65),
        "d": save_checkpoint(str(tmp_path / "d"), perturbed(base, 0.03, 6)),
    }
    for name, vocab in (("base", 64), ("a", 65), ("d", 65)):
        write_tokenizer(paths[name], vocab)
    with open(os.path.join(paths["d"], "config.json")) as f:
        config_json = json.load(f)
    with open(os.path.join(paths["d"], "config.json"), "w") as f:
        json.dump({**config_json, "vocab_size": config_vocab}, f)
    if config_vocab == 64:
        stock_error = KeyError
        named = (re.escape(f"model {paths['d']}'s tokenizer has token(s) at or past the vocab_size")
                 + r".*'w64' \(id 64 in its tokenizer\).*KeyError: 64")
    else:
        stock_error = IndexError
        named = (re.escape(f"model {paths['d']}'s tokenizer has token(s) past the 64 rows of its tensor 'model.")
                 + r"(embed_tokens|lm_head)\.weight': 'w64' \(id 64 in its tokenizer\).*IndexError: index 64")
    config = recipe(paths, ["a", "d"], tokenizer_source="union")
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match=named):
        run_recipe(config, out, merge_options)
    assert not safetensors_in(out)
    assert main(["coefficients", write_yaml(config, str(tmp_path / "r.yml"))]) == 1
    assert re.search(named, capsys.readouterr().err)
    with pytest.raises(stock_error):
        run_recipe(dict(config, merge_method="task_arithmetic",
                        models=[dict(m, parameters={"weight": 0.5}) for m in config["models"]]),
                   str(tmp_path / "stock"), merge_options)
    if stock_error is IndexError:
        forced = {k: v for k, v in config.items() if k != "tokenizer_source"}
        forced["tokenizer"] = {"source": "union", "tokens": {"w64": {"source": paths["a"], "force": True}}}
        run_recipe(forced, str(tmp_path / "forced"), merge_options)
        assert safetensors_in(str(tmp_path / "forced"))


def test_a_tokenizer_past_vocab_size_of_a_model_no_embedding_is_aligned_for_is_merged(tmp_path, merge_options,
                                                                                      capsys):
    """The same fine-tune d, in a frankenmerge's middle slice only: mergekit aligns the
    embeddings of the first and last slices' models, so d's token map is never read and
    the merge runs (as stock methods run it); `coefficients` too."""
    from merging import write_yaml
    from mergekit_metagpt.cli import main
    from mergekit_metagpt.synthetic import write_tokenizer

    base = random_state_dict(4, num_hidden_layers=3)
    grown = perturbed(random_state_dict(4, vocab_size=65, num_hidden_layers=3), 0.01, 5)
    paths = {
        "base": save_checkpoint(str(tmp_path / "base"), base, num_hidden_layers=3),
        "a": save_checkpoint(str(tmp_path / "a"), grown, vocab_size=65, num_hidden_layers=3),
        "d": save_checkpoint(str(tmp_path / "d"), perturbed(base, 0.03, 6), num_hidden_layers=3),
    }
    for name, vocab in (("base", 64), ("a", 65), ("d", 65)):
        write_tokenizer(paths[name], vocab)

    def layers(model, first, last):
        return [{"model": paths["base"], "layer_range": [first, last]},
                {"model": paths[model], "layer_range": [first, last]}]

    config = {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
              "tokenizer_source": "union",
              "slices": [{"sources": layers("a", 0, 1)}, {"sources": layers("d", 1, 2)},
                         {"sources": layers("a", 2, 3)}]}
    merged = run_recipe(config, str(tmp_path / "out"), merge_options)
    assert merged["model.embed_tokens.weight"].shape == (65, 32)
    assert main(["coefficients", write_yaml(config, str(tmp_path / "r.yml"))]) == 0, capsys.readouterr().err


def test_nan_in_base_rows_no_model_shares_is_named_as_the_base(tmp_path, merge_options):
    """The base has 72 token rows, the fine-tune 64; a NaN in a row only the base has
    (which `tokenizer_source: base` keeps in the output, and gives the fine-tune as its
    default): refused, naming the base and the tensor, before any weights are written."""
    from merging import safetensors_in
    from mergekit_metagpt.synthetic import write_tokenizer

    base = random_state_dict(3, vocab_size=72)
    base["model.embed_tokens.weight"][70, 5] = float("nan")
    model = perturbed(random_state_dict(3), 0.01, 8)
    paths = {
        "base": save_checkpoint(str(tmp_path / "base"), base, vocab_size=72),
        "model": save_checkpoint(str(tmp_path / "model"), model),
    }
    write_tokenizer(paths["base"], 72)
    write_tokenizer(paths["model"], 64)
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match=r"non-finite.*'model\.embed_tokens\.weight' of the base model"):
        run_recipe(recipe(paths, ["model"], tokenizer_source="base"), out, merge_options)
    assert not safetensors_in(out)


def test_other_shape_mismatch_is_an_error_naming_model_and_tensor(tmp_path, merge_options):
    base = random_state_dict(3)
    wider = random_state_dict(3, intermediate_size=56)
    paths = {
        "base": save_checkpoint(str(tmp_path / "base"), base),
        "wider": save_checkpoint(str(tmp_path / "wider"), wider, intermediate_size=56),
    }
    with pytest.raises(MetaGPTError, match=r"shape mismatch for tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight'.*wider"):
        run_recipe(recipe(paths, ["wider"]), str(tmp_path / "out"), merge_options)


@pytest.mark.parametrize("limited", [False, True], ids=["", "ulimit-v"])
@pytest.mark.parametrize("flags", [
    [], pytest.param(["--cuda"], marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_the_pre_pass_closes_a_shard_after_a_bounded_read_and_every_shard_at_its_end(flags, limited, tmp_path,
                                                                                     monkeypatch):
    """Mapped safetensors pages count in RSS: the pre-pass closes a model's shard once
    RELEASE_BYTES of its tensors were read since it was opened (so at most that and one
    tensor more stay mapped), and every shard at its end; a shard of many small tensors is
    not reopened, its header parsed again, for every tensor. On a GPU too (the tensors are
    read from the mapped files, then copied over). Under an address-space limit, shards
    stay open to the end: a shard closed while mergekit still holds tensors of it (the
    first merge task's inputs) would be mapped twice (a merge that passed `ulimit -v` with
    task_arithmetic failed with metagpt)."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    from merging import write_yaml
    from mergekit_metagpt.cli import main

    base = random_state_dict(0)
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base, shard_size=None)}
    for i, scale in enumerate((0.01, 0.05)):
        paths[f"model{i}"] = save_checkpoint(str(tmp_path / f"model{i}"), perturbed(base, scale, seed=i),
                                             shard_size=None)
    largest = max(t.nbytes for t in base.values())
    total = sum(t.nbytes for t in base.values())
    monkeypatch.setattr(prepass, "RELEASE_BYTES", total // 4)
    monkeypatch.setattr(prepass, "address_space_limited", lambda: limited)
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    mapped, most, flushes, loaders = {}, {}, [0], {}
    get_tensor, flush = LazyTensorLoader.get_tensor, LazyTensorLoader.flush

    def counting_get(self, key, *args, **kwargs):
        tensor = get_tensor(self, key, *args, **kwargs)
        loaders[id(self)] = self
        mapped[id(self)] = mapped.get(id(self), 0) + tensor.nbytes
        most[id(self)] = max(most.get(id(self), 0), mapped[id(self)])
        return tensor

    def counting_flush(self):
        flushes[0] += 1
        mapped[id(self)] = 0
        flush(self)

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", counting_get)
    monkeypatch.setattr(LazyTensorLoader, "flush", counting_flush)
    path = write_yaml(recipe(paths, ["model0", "model1"]), str(tmp_path / "r.yml"))
    runs = prepass.STATS.runs
    assert main(["coefficients", path, *flags]) == 0
    assert prepass.STATS.runs == runs + 1 and len(loaders) == 3
    assert prepass.STATS.last_device.startswith("cuda" if flags else "cpu")
    if limited:  # each shard opened once, closed at the end
        assert flushes[0] == 3 and min(most.values()) == total, (flushes, most, total)
    else:
        assert max(most.values()) <= total // 4 + largest, (most, total, largest)
        # about 4 closes per model (and one at the end), not one per tensor (len(base) each)
        assert flushes[0] <= 3 * 6 < 3 * len(base), flushes
    assert all(loader.current_shard is None for loader in loaders.values())


def test_a_finite_address_space_limit_is_seen(tmp_path):
    code = ("import resource\nfrom mergekit_metagpt.prepass import address_space_limited\n"
            "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
            "if hard == resource.RLIM_INFINITY:\n"
            "    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))\n"
            "    assert address_space_limited() is False\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 46, hard))\n"
            "print(address_space_limited())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-3000:]


def test_a_read_that_fails_mid_pre_pass_leaves_no_shard_mapped(llama_family, tmp_path, monkeypatch):
    """A read that opened its shard and then failed (a damaged tensor, mergekit's dtype
    check) leaves that shard closed too, as every other."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    from merging import write_yaml
    from mergekit_metagpt.cli import main

    paths, _ = llama_family
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    calls, loaders = [0], {}
    get_tensor = LazyTensorLoader.get_tensor

    def failing_get(self, key, *args, **kwargs):
        tensor = get_tensor(self, key, *args, **kwargs)  # the shard is open now
        loaders[id(self)] = self
        calls[0] += 1
        if calls[0] == 3:  # the first read of the third loader
            raise OSError("damaged tensor data")
        return tensor

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", failing_get)
    path = write_yaml(recipe(paths, ["model0", "model1"]), str(tmp_path / "r.yml"))
    assert main(["coefficients", path]) == 1
    assert calls[0] == 3 and len(loaders) == 3
    assert all(loader.current_shard is None for loader in loaders.values())


def test_norms_of_a_merge_on_a_device_without_float64_are_summed_on_the_cpu(monkeypatch):
    """``--device mps`` (Apple's GPUs have no float64): the pre-pass's float64 sums there
    raised a TypeError; they are taken on the CPU. Other devices keep their own."""
    from types import SimpleNamespace

    from mergekit_metagpt.norms import norms_device

    assert norms_device(torch.device("mps")) == torch.device("cpu")
    assert norms_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    seen = []
    monkeypatch.setattr(prepass, "compute", lambda run, device, method, products, given=None: seen.append(device) or "norms")
    monkeypatch.setattr(prepass, "_announce", lambda run: None)
    run = SimpleNamespace(lock=threading.Lock(), error=None, result=None, held_records=[], inputs_run=set())
    assert prepass.run_norms(run, torch.device("mps")) == "norms" and seen == [torch.device("cpu")]


def test_a_torch_without_autocast_for_the_device_still_merges(monkeypatch):
    """torch before 2.5 has no autocast for ``mps`` and raised "unsupported autocast
    device_type" where the merge turns autocast off: nothing is cast there to turn off."""
    from mergekit.merge_methods import merge_state_dicts

    base = random_state_dict(seed=3)
    sds = {"base": base, **{f"m{i}": perturbed(base, scale, seed=i) for i, scale in enumerate((0.01, 0.03))}}

    def no_such_autocast(*args, **kwargs):
        raise RuntimeError("User specified an unsupported autocast device_type 'cpu'")

    monkeypatch.setattr(torch, "autocast", no_such_autocast)
    merged = merge_state_dicts(sds, "metagpt", base="base")
    _, reference = closed_form(base, [sds["m0"], sds["m1"]])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_child_forked_while_another_thread_holds_the_plugins_locks_takes_them():
    """A fork while another thread of the parent held a lock of the plugin's (the memo's, the
    plan registry's, the registration's …: a pipeline's worker pool forked mid-merge) left the
    child waiting on it for ever; and mergekit's loaders, each with a lock held while a tensor
    is read, are forgotten so that the child's merge replaces them."""
    from mergekit_metagpt import integration, merge_plan, norm_cache, norm_memo, planning, progress, registration

    locks = {"memo": (norm_memo, "_MEMO_LOCK"), "registry": (merge_plan, "_REGISTRY_LOCK"),
             "attach": (integration, "_LOCK"), "registration": (registration, "_LOCK"),
             "progress": (progress, "_SWAP_LOCK"), "cache warnings": (norm_cache, "_WARNED_LOCK")}

    class Loader:  # stands for a mergekit loader the plugin opened
        pass

    opened = Loader()
    planning._OPENED_AT[opened] = "key"
    holding, release = threading.Event(), threading.Event()

    def hold():
        held = [getattr(module, name) for module, name in locks.values()]
        for lock in held:
            lock.acquire()
        holding.set()
        release.wait(60)
        for lock in held:
            lock.release()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(30)
    said, tell = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            try:
                free = [what for what, (module, name) in locks.items() if getattr(module, name).acquire(timeout=2)]
                forgotten = len(planning._OPENED_AT) == 0
                os.write(tell, (",".join(free) + "|" + str(forgotten)).encode())
            finally:
                os._exit(0)
        os.close(tell)
        answer = b""
        while True:
            part = os.read(said, 1024)
            if not part:
                break
            answer += part
        os.waitpid(child, 0)
    finally:
        release.set()
        holder.join(30)
    free, forgotten = answer.decode().split("|")
    assert free.split(",") == list(locks) and forgotten == "True", answer
    assert planning._OPENED_AT.get(opened) == "key"  # the parent's own are as they were


def test_a_checkpoint_task_vector_too_small_for_float32_squares_is_warned_of(tmp_path, merge_options, caplog):
    """Read from checkpoints, the norms are float32 sums of squares (tensors are not kept for
    a second, float64 pass as in memory): weights of 1e-20 moved by 1e-23 give squares that
    lose digits, so the merge says its λ may be inexact, naming each model."""
    import logging

    base = {k: v * 1e-20 for k, v in random_state_dict(3).items()}
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base)}
    for i, scale in enumerate([1e-23, 3e-23]):
        paths[f"m{i}"] = save_checkpoint(str(tmp_path / f"m{i}"), perturbed(base, scale, 10 + i))
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    run_recipe(recipe(paths, ["m0", "m1"]), str(tmp_path / "out"), merge_options)
    said = [r.getMessage() for r in caplog.records if "task vector is tiny" in r.getMessage()]
    assert len(said) == 2 and "/m0" in said[0] and "/m1" in said[1], said
    assert "may be inexact" in said[0]
