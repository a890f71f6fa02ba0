"""The streaming pre-pass: once per merge, never stale, thread-safe, shape checks."""

import logging
import threading

import pytest
import torch

import mergekit_metagpt  # noqa: F401
from checkpoints import closed_form, perturbed, random_state_dict, save_checkpoint
from merging import recipe, run_recipe
from mergekit.common import ModelReference
from mergekit_metagpt import prepass
from mergekit_metagpt.errors import MetaGPTError

MODELS = ("model0", "model1", "model2")


def refs(paths, names):
    return [ModelReference.parse(paths[n]) for n in names]


def test_prepass_runs_exactly_once_per_merge(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    prepass.clear_memo()
    runs, read = prepass.STATS.runs, prepass.STATS.tensors_read
    run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)
    assert prepass.STATS.runs == runs + 1
    # every tensor of the base and of each of the three models read once
    assert prepass.STATS.tensors_read - read == 4 * len(sds["base"])


def test_rewritten_checkpoints_get_fresh_norms(tmp_path, merge_options):
    base = random_state_dict(1)
    paths = {"base": save_checkpoint(str(tmp_path / "base"), base)}
    first = {f"m{i}": perturbed(base, s, i) for i, s in enumerate((0.01, 0.1))}
    for name, sd in first.items():
        paths[name] = save_checkpoint(str(tmp_path / name), sd)
    run_recipe(recipe(paths, ["m0", "m1"]), str(tmp_path / "out1"), merge_options)

    # mergekit 0.1.5 keeps each loader's last shard open across run_merge calls
    # (LoaderCache is process-wide), so it would itself read stale weights for the
    # tensors in that shard; flushing is what a pipeline must do between merges.
    from mergekit.io.tasks import LoaderCache

    LoaderCache().flush_all()
    # same paths (same ModelReferences), other weights: the scales swap
    second = {f"m{i}": perturbed(base, s, 10 + i) for i, s in enumerate((0.1, 0.01))}
    for name, sd in second.items():
        save_checkpoint(str(tmp_path / name), sd)
    merged = run_recipe(recipe(paths, ["m0", "m1"]), str(tmp_path / "out2"), merge_options)
    lams, reference = closed_form(base, [second["m0"], second["m1"]])
    assert lams[0] > 0.9
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5, name


def test_concurrent_callers_share_one_prepass(llama_family):
    paths, sds = llama_family
    prepass.clear_memo()
    runs = prepass.STATS.runs
    base, models = refs(paths, ["base"])[0], refs(paths, MODELS)
    results, errors = [], []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            results.append(prepass.checkpoint_norms(base, models, torch.device("cpu")))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 8
    assert prepass.STATS.runs == runs + 1
    assert all(r == results[0] for r in results)
    expected = sum(float((sds["model2"][k].double() - sds["base"][k].double()).pow(2).sum()) for k in sds["base"])
    got = sum(results[0][models[2]].values())
    assert abs(got - expected) / expected < 1e-5


def test_resized_vocabulary_is_excluded_with_one_warning(tmp_path, caplog):
    base = random_state_dict(2)
    resized = random_state_dict(2, vocab_size=72)
    for name in base:
        if resized[name].shape == base[name].shape:
            resized[name] = base[name] + 0.01
    b = save_checkpoint(str(tmp_path / "base"), base)
    r = save_checkpoint(str(tmp_path / "resized"), resized, vocab_size=72)
    caplog.set_level(logging.INFO, logger="mergekit_metagpt")
    base_ref, model_ref = ModelReference.parse(b), ModelReference.parse(r)
    norms = prepass.checkpoint_norms(base_ref, [model_ref], torch.device("cpu"))[model_ref]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "model.embed_tokens.weight" in warnings[0] and "lm_head.weight" in warnings[0]
    assert "model.embed_tokens.weight" not in norms and "lm_head.weight" not in norms
    expected = sum(0.01 ** 2 * base[k].numel() for k in base if k in norms)
    assert abs(sum(norms.values()) - expected) / expected < 1e-3


def test_other_shape_mismatch_is_an_error_naming_model_and_tensor(tmp_path):
    base = random_state_dict(3)
    wider = random_state_dict(3, intermediate_size=56)
    b = save_checkpoint(str(tmp_path / "base"), base)
    w = save_checkpoint(str(tmp_path / "wider"), wider, intermediate_size=56)
    with pytest.raises(MetaGPTError, match=r"shape mismatch for tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight'.*wider"):
        prepass.checkpoint_norms(ModelReference.parse(b), [ModelReference.parse(w)], torch.device("cpu"))
