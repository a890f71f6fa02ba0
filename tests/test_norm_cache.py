"""The on-disk norm cache: hits skip the pre-pass, changes miss, damage only warns."""

import json
import logging
import os

import pytest
import torch

from checkpoints import closed_form, perturbed, save_checkpoint
from merging import recipe, run_recipe, safetensors_in
from mergekit_metagpt import norm_cache, prepass

MODELS = ["model0", "model1", "model2"]


def entries():
    folder = norm_cache.cache_dir()
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def fresh_process_state():
    """What a new process would have: no in-memory memo."""
    prepass.clear_memo()


def test_rerun_and_new_combinations_skip_the_prepass(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    fresh_process_state()
    run_recipe(recipe(paths, MODELS), str(tmp_path / "a"), merge_options)
    assert len(entries()) == 3

    fresh_process_state()
    runs, hits = prepass.STATS.runs, prepass.STATS.cache_hits
    merged = run_recipe(recipe(paths, MODELS), str(tmp_path / "b"), merge_options)
    assert prepass.STATS.runs == runs and prepass.STATS.cache_hits == hits + 3
    _, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5

    fresh_process_state()
    run_recipe(recipe(paths, ["model2", "model0"]), str(tmp_path / "c"), merge_options)
    assert prepass.STATS.runs == runs


def test_changed_checkpoint_misses(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    fresh_process_state()
    run_recipe(recipe(paths, ["model0"]), str(tmp_path / "a"), merge_options)
    # a copy of model0 with one tensor changed: other files, other fingerprint
    changed = dict(sds["model0"])
    changed["model.norm.weight"] = changed["model.norm.weight"] + 1.0
    paths = {**paths, "changed": save_checkpoint(str(tmp_path / "changed"), changed)}
    fresh_process_state()
    runs = prepass.STATS.runs
    run_recipe(recipe(paths, ["changed"]), str(tmp_path / "b"), merge_options)
    assert prepass.STATS.runs == runs + 1


def test_corrupt_entry_warns_and_recomputes(llama_family, merge_options, tmp_path, caplog):
    paths, sds = llama_family
    fresh_process_state()
    run_recipe(recipe(paths, ["model0", "model2"]), str(tmp_path / "a"), merge_options)
    for name in entries():
        path = os.path.join(norm_cache.cache_dir(), name)
        with open(path, "w") as f:
            f.write('{"format": 1, "per_tensor": {"x": "oops"')  # truncated JSON
    fresh_process_state()
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    runs = prepass.STATS.runs
    merged = run_recipe(recipe(paths, ["model0", "model2"]), str(tmp_path / "b"), merge_options)
    assert prepass.STATS.runs == runs + 1
    assert any("unreadable norm cache entry" in r.getMessage() for r in caplog.records)
    _, reference = closed_form(sds["base"], [sds["model0"], sds["model2"]])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5
    # and the bad entries were replaced by good ones
    for name in entries():
        with open(os.path.join(norm_cache.cache_dir(), name)) as f:
            assert json.load(f)["format"] == norm_cache.FORMAT


def test_unwritable_cache_warns_and_merges(llama_family, merge_options, tmp_path, monkeypatch, caplog):
    paths, _ = llama_family
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(blocker / "norms"))
    fresh_process_state()
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    run_recipe(recipe(paths, ["model1"]), str(tmp_path / "out"), merge_options)
    assert any("could not write the norm cache" in r.getMessage() for r in caplog.records)


def test_disabled_cache_writes_nothing(llama_family, merge_options, tmp_path, monkeypatch):
    paths, _ = llama_family
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    fresh_process_state()
    run_recipe(recipe(paths, ["model1"]), str(tmp_path / "out"), merge_options)
    assert entries() == []


def test_interrupted_write_leaves_no_entry_and_no_temp_file(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        norm_cache.store("b" * 64, "m" * 64, {"t": 1.0})
    assert entries() == []


def test_ctrl_c_during_the_prepass_leaves_no_entry(llama_family, merge_options, tmp_path, monkeypatch):
    from mergekit_metagpt import norms

    paths, _ = llama_family
    fresh_process_state()
    calls = {"n": 0}
    real = norms.squared_delta

    def interrupt_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepass, "squared_delta", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)
    assert entries() == []
    assert not safetensors_in(str(tmp_path / "out"))  # interrupted before any weights
