"""The on-disk norm cache: hits skip the pre-pass, changes miss, damage only warns."""

import json
import logging
import os
import struct

import pytest
import torch

from checkpoints import closed_form, perturbed, save_checkpoint
from merging import recipe, run_recipe, safetensors_in, write_yaml
from mergekit_metagpt import norm_cache, norm_memo, prepass

MODELS = ["model0", "model1", "model2"]


def entries(kind="norms"):
    """The cache's entries of one kind: "norms" (per pair) or "products" (per triple)."""
    import json

    folder = norm_cache.cache_dir()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
    return [n for n in names if kind in json.load(open(os.path.join(folder, n)))]


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
    assert len(entries("products")) == 3
    with open(tmp_path / "c" / "metagpt_coefficients.json") as f:  # the pair's product, either order
        cosine = json.load(f)["merges"][0]["cosine_similarity"]
    assert cosine["matrix"][0][1] is not None and cosine["note"] is None


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


def test_an_index_edited_alone_misses(llama_family, merge_options, tmp_path):
    """Only model.safetensors.index.json changes (a hub revision can keep every shard
    blob): it no longer lists lm_head, so mergekit reads the tied embed_tokens in its
    place. The cached norm (of the old lm_head) must not be reused."""
    import shutil

    paths, sds = llama_family
    copy = str(tmp_path / "model0")
    shutil.copytree(paths["model0"], copy)
    paths = {**paths, "edited": copy}
    run_recipe(recipe(paths, ["edited", "model1"]), str(tmp_path / "a"), merge_options)
    index_path = os.path.join(copy, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    del index["weight_map"]["lm_head.weight"]
    with open(index_path, "w") as f:
        json.dump(index, f)
    from mergekit.io.tasks import LoaderCache

    for ref in [r for r in LoaderCache.loaders if r.model.path == copy]:
        del LoaderCache.loaders[ref]  # as in a new process: mergekit reads the index again
    fresh_process_state()
    run_recipe(recipe(paths, ["edited", "model1"]), str(tmp_path / "b"), merge_options)
    with open(tmp_path / "b" / "metagpt_coefficients.json") as f:
        rows = json.load(f)["merges"][0]["models"]
    model, base = sds["model0"], sds["base"]
    read = {k: (model["model.embed_tokens.weight"] if k == "lm_head.weight" else model[k]) for k in base}
    expected = sum(float((read[k].double() - base[k].double()).pow(2).sum()) for k in base)
    stale = sum(float((model[k].double() - base[k].double()).pow(2).sum()) for k in base)
    assert abs(stale - expected) / expected > 1e-3  # the edit changes the norm
    assert abs(rows[0]["squared_norm"] - expected) / expected < 1e-6, (rows[0]["squared_norm"], expected, stale)


def test_an_entry_of_the_previous_format_is_not_read(llama_family, merge_options, tmp_path):
    """Format 2 entries could hold norms of reads whose rule is gone (the leading rows of
    resized vocabularies): an entry the previous version wrote for the same pair and the
    same read keys, with its notes, is not read; the norms are computed."""
    import hashlib

    paths, sds = llama_family
    fresh_process_state()
    run_recipe(recipe(paths, ["model0"]), str(tmp_path / "a"), merge_options)
    (name,) = entries()
    path = os.path.join(norm_cache.cache_dir(), name)
    with open(path) as f:
        entry = json.load(f)
    os.remove(path)
    old = hashlib.sha256(f"v2|{entry['base']}|{entry['model']}".encode()).hexdigest()
    planted = dict(entry, format=2, norms={k: 1.0 for k in entry["norms"]}, notes={})
    with open(os.path.join(norm_cache.cache_dir(), f"{old}.json"), "w") as f:
        json.dump(planted, f)
    fresh_process_state()
    runs = prepass.STATS.runs
    run_recipe(recipe(paths, ["model0"]), str(tmp_path / "b"), merge_options)
    assert prepass.STATS.runs == runs + 1  # read the tensors again
    with open(tmp_path / "b" / "metagpt_coefficients.json") as f:
        (row,) = json.load(f)["merges"][0]["models"]
    expected = sum(float((sds["model0"][k].double() - sds["base"][k].double()).pow(2).sum()) for k in sds["base"])
    assert abs(row["squared_norm"] - expected) / expected < 1e-6


def test_a_cache_folder_that_cannot_be_read_warns_once(llama_family, merge_options, tmp_path, monkeypatch, caplog):
    """A cache folder the system cannot read (here a file where the folder should be): one
    warning for reading and one for writing, not one per entry; the merge is right."""
    paths, sds = llama_family
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(tmp_path / "not-a-folder" / "norms"))
    fresh_process_state()
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    merged = run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("could not read the norm cache" in m for m in messages) == 1, messages
    assert sum("could not write the norm cache" in m for m in messages) == 1, messages
    assert not any("unreadable norm cache entry" in m for m in messages)
    _, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5


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


def _spoil_one_value(kind: str, field: str, bad: str) -> None:
    """Replace one number of every entry of `kind` by the JSON text `bad`."""
    for name in entries(kind):
        path = os.path.join(norm_cache.cache_dir(), name)
        with open(path) as f:
            data = json.load(f)
        key = next(k for k, v in data[field].items() if v is not None)
        data[field][key] = "__BAD__"
        with open(path, "w") as f:
            f.write(json.dumps(data).replace('"__BAD__"', bad))


def _merge_again_with_a_spoiled_value(kind: str, bad: str, paths, models, merge_options, tmp_path, caplog):
    """Merge into tmp_path/a, spoil one value of every cache entry of `kind` (its JSON text
    `bad`), then merge again, as a new process would, into tmp_path/b (its weights)."""
    run_recipe(recipe(paths, models), str(tmp_path / "a"), merge_options)
    _spoil_one_value(kind, kind, bad)
    fresh_process_state()
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    return run_recipe(recipe(paths, models), str(tmp_path / "b"), merge_options)


def _recorded_lambdas(out):
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        (entry,) = json.load(f)["merges"]
    return [row["lambda"] for row in entry["models"]]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-1.5", "1" + "0" * 400])
def test_a_norm_no_prepass_writes_makes_the_entry_corrupt(bad, llama_family, merge_options, tmp_path, caplog):
    """Not finite, negative, or beyond a float: warned about and recomputed (it gave NaN
    weights, negative λ, or an OverflowError on every later run)."""
    paths, sds = llama_family
    models = ["model0", "model2"]
    runs = prepass.STATS.runs
    merged = _merge_again_with_a_spoiled_value("norms", bad, paths, models, merge_options, tmp_path, caplog)
    assert prepass.STATS.runs == runs + 2
    assert any("corrupt norm cache entry" in r.getMessage() for r in caplog.records)
    lams, reference = closed_form(sds["base"], [sds[m] for m in models])
    assert _recorded_lambdas(tmp_path / "b") == pytest.approx(lams, abs=1e-6)
    for name, ref in reference.items():
        assert (merged[name].double() - ref).abs().max().item() < 1e-5
    for name in entries():  # replaced by good entries
        with open(os.path.join(norm_cache.cache_dir(), name)) as f:
            assert all(v is None or v >= 0 for v in json.load(f)["norms"].values())


def test_finite_norms_whose_sum_overflows_are_refused_before_any_weights(llama_family, merge_options, tmp_path):
    """Every cached value 1e308 (each finite, as the entry check asks): a model's total is
    Inf. Its λ were NaN and the merge wrote all-NaN weights with no error."""
    from mergekit_metagpt.errors import MetaGPTError

    paths, _ = llama_family
    models = ["model0", "model2"]
    run_recipe(recipe(paths, models), str(tmp_path / "a"), merge_options)
    for name in entries():
        path = os.path.join(norm_cache.cache_dir(), name)
        with open(path) as f:
            data = json.load(f)
        data["norms"] = {k: (None if v is None else 1e308) for k, v in data["norms"].items()}
        with open(path, "w") as f:
            json.dump(data, f)
    fresh_process_state()
    with pytest.raises(MetaGPTError, match=r"model .*model0.*'s squared task-vector norm is inf .*float64"):
        run_recipe(recipe(paths, models), str(tmp_path / "b"), merge_options)
    assert not list((tmp_path / "b").glob("*.safetensors"))


def test_lambdas_of_finite_norms_whose_sum_overflows_are_their_shares():
    """Each model's norm finite, their sum not: λ are still the shares (they were 0 for
    every model: x / Inf), in the tempered form too."""
    from mergekit_metagpt.coefficients import Coefficients
    from mergekit_metagpt.errors import MetaGPTError

    assert Coefficients.from_norms({"a": 1.5e308, "b": 0.5e308}).lambdas == {"a": 0.75, "b": 0.25}
    assert Coefficients.from_norms({"a": 4.0, "b": 1.0, "c": 0.0}).lambdas == {"a": 0.8, "b": 0.2, "c": 0.0}
    tempered = Coefficients.from_norms({"a": 1.5e308, "b": 0.5e308}, alpha=0.5).lambdas
    assert tempered["a"] == pytest.approx(3 ** 0.5 / (3 ** 0.5 + 1), rel=1e-12)
    with pytest.raises(MetaGPTError, match="model b's squared task-vector norm is nan"):
        Coefficients.from_norms({"a": 1.0, "b": float("nan")}).lambdas


def test_lacks_it_for_a_tensor_the_checkpoint_holds_is_read_again(llama_family, merge_options, tmp_path, caplog):
    """null (what the pre-pass records of an optional tensor a model lacks) for a tensor the
    model's checkpoint holds: not trusted (it dropped that tensor from the model's norm:
    λ 13% off, silently); warned of and read again, the λ exact."""
    paths, sds = llama_family
    models = ["model0", "model2"]
    runs = prepass.STATS.runs
    _merge_again_with_a_spoiled_value("norms", "null", paths, models, merge_options, tmp_path, caplog)
    assert prepass.STATS.runs == runs + 2
    said = [r.getMessage() for r in caplog.records if "lacks tensor" in r.getMessage()]
    assert len(said) == 2 and all(m.endswith("which its checkpoint holds: read again") for m in said), said
    lams, _ = closed_form(sds["base"], [sds[m] for m in models])
    assert _recorded_lambdas(tmp_path / "b") == pytest.approx(lams, abs=1e-9)


def test_a_product_that_is_not_finite_makes_the_entry_corrupt(llama_family, merge_options, tmp_path, caplog):
    """A NaN inner product read back showed as cosine +1 and warned of a far pair."""
    paths, _ = llama_family
    models = ["model0", "model2"]
    _merge_again_with_a_spoiled_value("products", "NaN", paths, models, merge_options, tmp_path, caplog)
    assert any("corrupt norm cache entry" in r.getMessage() for r in caplog.records)
    assert not any("far from orthogonal" in r.getMessage() for r in caplog.records)
    with open(tmp_path / "b" / "metagpt_coefficients.json") as f:
        (entry,) = json.load(f)["merges"]
    assert entry["cosine_similarity"]["matrix"][0][1] is None  # norms cached: not computed again


def test_a_write_keeps_what_another_process_stored_meanwhile(llama_family, merge_options, tmp_path, monkeypatch):
    """Two processes reading other tensors of one pair (other slices): the one that looked
    before the other wrote still keeps the other's reads when it writes."""
    paths, _ = llama_family

    def one_layer(layer):
        sources = [{"model": paths[m], "layer_range": [layer, layer + 1]} for m in ("base", "model0", "model1")]
        return {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
                "slices": [{"sources": sources}]}

    def stored():
        keys = set()
        for kind in ("norms", "products"):
            for name in entries(kind):
                with open(os.path.join(norm_cache.cache_dir(), name)) as f:
                    keys |= {(name, key) for key in json.load(f)[kind]}
        return keys

    run_recipe(one_layer(0), str(tmp_path / "first"), merge_options)
    first = stored()
    fresh_process_state()
    real_load = norm_cache.load
    # the second process's first look came before the first process wrote
    real_products = norm_cache.load_products
    monkeypatch.setattr(norm_cache, "load", lambda *a, quiet=False: real_load(*a, quiet=quiet) if quiet else None)
    monkeypatch.setattr(norm_cache, "load_products",
                        lambda *a, quiet=False: real_products(*a, quiet=quiet) if quiet else None)
    run_recipe(one_layer(1), str(tmp_path / "second"), merge_options)
    assert {name for name, _ in first} == {name for name, _ in stored()}  # 2 pairs, 1 triple
    assert first < stored()  # layer 0's reads kept, layer 1's added, for norms and products


def test_two_threads_writing_one_entry_keep_both_reads(monkeypatch):
    """A thread whose write is slow must not overwrite, with its older values, what a second
    thread wrote meanwhile (one writer per entry at a time)."""
    import threading
    import time

    real_store = norm_cache.store
    a_storing, release_a = threading.Event(), threading.Event()

    def store(base, model, norms, labels=("", "")):
        if "b" not in norms:  # thread A's values
            a_storing.set()
            release_a.wait(10)
        real_store(base, model, norms, labels=labels)

    monkeypatch.setattr(norm_cache, "store", store)
    a = threading.Thread(target=norm_memo.remember, args=("base-key", "model-key", {"a": 1.0}, ("b", "m")))
    a.start()
    assert a_storing.wait(10)
    b = threading.Thread(target=norm_memo.remember, args=("base-key", "model-key", {"b": 2.0}, ("b", "m")))
    b.start()
    time.sleep(0.3)  # without a lock per entry, B writes {a, b} now and A then writes {a}
    release_a.set()
    a.join(10)
    b.join(10)
    assert norm_cache.load("base-key", "model-key") == {"a": 1.0, "b": 2.0}


def test_a_first_lookup_does_not_overwrite_what_another_thread_stored(monkeypatch):
    """A lookup reads the disk outside the memo's lock; values another thread stored in the
    meantime stay in the memo (else later merges of the process read those tensors again)."""
    import threading

    real_load = norm_cache.load
    loaded, go_on = threading.Event(), threading.Event()

    def load(base, model, quiet=False):
        found = real_load(base, model, quiet=quiet)
        if not quiet:  # the lookup's own load, not the store's
            loaded.set()
            go_on.wait(10)
        return found

    monkeypatch.setattr(norm_cache, "load", load)
    lookup = threading.Thread(target=norm_memo.known, args=("base-key", "model-key"))
    lookup.start()
    assert loaded.wait(10)
    norm_memo.remember("base-key", "model-key", {"stored": 1.0}, ("b", "m"))
    go_on.set()
    lookup.join(10)
    monkeypatch.setattr(norm_cache, "load", lambda *a, **k: pytest.fail("the memo holds this entry"))
    assert norm_memo.known("base-key", "model-key") == {"stored": 1.0}


def test_what_another_process_added_to_the_cache_is_used_though_the_memo_holds_the_pair(
        llama_family, merge_options, tmp_path):
    """A long-lived process (a notebook, a pipeline's driver) merged a slice of the models, so
    its memo held those pairs' entries; a worker process then merged the whole models, adding
    the other tensors' norms to the same entries on disk. The driver's merge of the whole
    models read every tensor again (0 hits), where a new process read none."""
    from collections import OrderedDict

    from merging import slices_recipe

    paths, sds = llama_family
    fresh_process_state()
    run_recipe(slices_recipe(paths), str(tmp_path / "slices"), merge_options)
    driver_memo = OrderedDict((k, dict(v)) for k, v in norm_memo._MEMO.items())
    fresh_process_state()  # the worker: a process of its own
    run_recipe(recipe(paths, MODELS), str(tmp_path / "worker"), merge_options)
    norm_memo._MEMO.clear()  # back in the driver
    norm_memo._MEMO.update(driver_memo)
    runs, hits = prepass.STATS.runs, prepass.STATS.cache_hits
    run_recipe(recipe(paths, MODELS), str(tmp_path / "driver"), merge_options)
    assert (prepass.STATS.runs, prepass.STATS.cache_hits) == (runs, hits + 3)
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    assert _recorded_lambdas(tmp_path / "driver") == pytest.approx(lams, rel=1e-7)


def test_a_merge_looks_each_cache_entry_up_once(llama_family, merge_options, tmp_path, monkeypatch):
    """Each pair's and triple's entry is looked up once per merge, whether it is missing (a
    first merge), partial (a slice merged before) or whole: the lookup for a key the memo
    lacks is the one that reads it again (a first merge read each missing entry twice)."""
    from collections import Counter

    from merging import slices_recipe

    paths, _ = llama_family
    lookups = Counter()
    for name in ("load", "load_products"):
        real = getattr(norm_cache, name)

        def counted(*keys, quiet=False, _real=real, _name=name):
            if not quiet:  # a lookup's own read, not a write's
                lookups[_name] += 1
                lookups[keys] += 1
            return _real(*keys, quiet=quiet)

        monkeypatch.setattr(norm_cache, name, counted)
    for out in ("cold", "warm"):
        fresh_process_state()
        lookups.clear()
        run_recipe(recipe(paths, MODELS), str(tmp_path / out), merge_options)
        assert (lookups["load"], lookups["load_products"]) == (3, 3), out
        assert all(n == 1 for keys, n in lookups.items() if isinstance(keys, tuple)), out
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(tmp_path / "another-cache"))
    fresh_process_state()
    run_recipe(slices_recipe(paths), str(tmp_path / "slices"), merge_options)
    lookups.clear()  # the memo holds partial entries: read again, once each, where they lack a key
    run_recipe(recipe(paths, MODELS), str(tmp_path / "whole"), merge_options)
    assert lookups["load"] >= 1
    assert all(n == 1 for keys, n in lookups.items() if isinstance(keys, tuple))


def test_inner_products_another_process_added_are_used_though_the_memo_holds_the_triple(
        llama_family, merge_options, tmp_path, monkeypatch):
    """The same for inner products: the driver's merge had them off (COSINES=0), a worker's
    `inspect` stored them; the driver's `inspect` (which wants every pair's) read every
    tensor again."""
    from collections import OrderedDict

    from mergekit_metagpt.cli import main as cli_main

    paths, _ = llama_family
    path = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    fresh_process_state()
    monkeypatch.setenv("MERGEKIT_METAGPT_COSINES", "0")
    run_recipe(recipe(paths, MODELS), str(tmp_path / "driver"), merge_options)
    monkeypatch.delenv("MERGEKIT_METAGPT_COSINES")
    memos = [OrderedDict((k, dict(v)) for k, v in memo.items()) for memo in (norm_memo._MEMO, norm_memo._PRODUCTS_MEMO)]
    assert not any(memos[1].values())  # looked up, none known
    fresh_process_state()  # the worker: a process of its own, whose inspect reads the products
    assert cli_main(["inspect", path, str(tmp_path / "worker"), "--no-pictures"]) == 0
    assert len(entries("products")) == 3
    for memo, kept in zip((norm_memo._MEMO, norm_memo._PRODUCTS_MEMO), memos):  # back in the driver
        memo.clear()
        memo.update(kept)
    runs = prepass.STATS.runs
    assert cli_main(["inspect", path, str(tmp_path / "inspect"), "--no-pictures"]) == 0
    assert prepass.STATS.runs == runs
    with open(tmp_path / "inspect" / "metagpt-inspect.json") as f:
        (entry,) = json.load(f)["merges"]
    assert all(v is not None for row in entry["cosine"] for v in row)


def test_the_memo_keeps_its_latest_entries_and_reads_a_dropped_one_from_disk_again(monkeypatch):
    """A process merging checkpoints rewritten between merges (each version another key) keeps
    at most MEMO_ENTRIES per memo, the least recently used dropped: an entry asked for again
    stays, and a dropped one comes back from the disk cache, unchanged."""
    monkeypatch.setattr(norm_memo, "MEMO_ENTRIES", 4)
    norm_memo.remember("base-key", "model-0", {"t": 0.0}, ("b", "m"))
    for version in range(1, 7):
        norm_memo.remember("base-key", f"model-{version}", {"t": float(version)}, ("b", "m"))
        assert norm_memo.known("base-key", "model-0") == {"t": 0.0}  # in use: kept
    assert list(norm_memo._MEMO) == [("base-key", f"model-{v}") for v in (4, 5, 6)] + [("base-key", "model-0")]
    norm_memo.remember_products(["base-key", "model-1", "model-2"], {"t": 0.5}, ("b", "m", "n"))
    for version in range(3, 9):
        norm_memo.remember_products(["base-key", "model-1", f"model-{version}"], {"t": 1.0}, ("b", "m", "n"))
    assert len(norm_memo._PRODUCTS_MEMO) == 4
    loads = []
    real_load = norm_cache.load
    monkeypatch.setattr(norm_cache, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert norm_memo.known("base-key", "model-1") == {"t": 1.0}  # dropped: from disk
    assert loads == [("base-key", "model-1")]
    assert norm_memo.known_products("base-key", "model-1", "model-2") == {"t": 0.5}


OTHER_PROCESS = """
import fcntl, os, sys
from mergekit_metagpt import norm_cache
os.makedirs(norm_cache.cache_dir(), exist_ok=True)
with open(os.path.join(norm_cache.cache_dir(), ".lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    norm_cache.store("base-key", "model-key", {"theirs": 2.0})
"""


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_write_waits_for_another_process_writing(monkeypatch):
    """Another process that holds the cache's lock is writing the same entry: this one waits
    and then merges with what it wrote (without the lock, it would write first and the other
    process would then drop its read)."""
    import subprocess
    import sys
    import threading
    import time

    other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        ours = threading.Thread(target=norm_memo.remember, args=("base-key", "model-key", {"ours": 1.0}, ("b", "m")))
        ours.start()
        time.sleep(0.5)
        assert ours.is_alive()  # waiting for the lock
        other.communicate("go\n", timeout=60)
        ours.join(30)
        assert not ours.is_alive()
    finally:
        other.kill()
    assert norm_cache.load("base-key", "model-key") == {"ours": 1.0, "theirs": 2.0}


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_a_lock_held_too_long_only_delays_the_write(monkeypatch, caplog):
    """A process stopped while holding the lock: the write goes ahead after LOCK_WAIT_S, and
    the next writes of the merge (T + T(T−1)/2 entries) do not wait again."""
    import fcntl
    import time

    monkeypatch.setattr(norm_cache, "LOCK_WAIT_S", 1.0)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    os.makedirs(norm_cache.cache_dir(), exist_ok=True)
    with open(os.path.join(norm_cache.cache_dir(), ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        for model in ("m0", "m1", "m2"):
            norm_memo.remember("base-key", model, {"ours": 1.0}, ("b", model))
        waited = time.monotonic() - started
    assert [norm_cache.load("base-key", m) for m in ("m0", "m1", "m2")] == [{"ours": 1.0}] * 3
    assert sum("stayed locked" in r.getMessage() for r in caplog.records) == 1
    assert 1.0 <= waited < 2.5  # one wait, not three (3 s)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_child_forked_during_a_write_does_not_keep_the_lock():
    """A flock belongs to the open file, which a forked child shares: a child forked while a
    write held the lock kept it until it exited, and every other process waited for it (and
    the child's copy of the held thread lock would never be released)."""
    import fcntl
    import time

    started, tell = os.pipe()
    with norm_cache.folder_lock():
        child = os.fork()
        if child == 0:  # the child lives on for 3 s, doing nothing with the lock
            try:
                os.write(tell, b"x")  # after the fork handlers have run
                # this process's thread lock was held at the fork: the child's own is free
                os.write(tell, b"1" if norm_cache._ONE_THREAD.acquire(timeout=1) else b"0")
                time.sleep(3)
            finally:
                os._exit(0)
    said = b""
    while len(said) < 2:
        said += os.read(started, 2 - len(said))
    assert said == b"x1"
    try:
        with open(os.path.join(norm_cache.cache_dir(), ".lock")) as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the child has it
    finally:
        os.waitpid(child, 0)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="flock; file modes (not root)")
def test_a_lock_file_this_user_cannot_write_still_locks():
    """Another user's lock file (0644 in a shared folder): opened read-only, it still locks
    (opened for writing, it failed and the write went ahead without any lock)."""
    import fcntl

    os.makedirs(norm_cache.cache_dir(), exist_ok=True)
    path = os.path.join(norm_cache.cache_dir(), ".lock")
    open(path, "w").close()
    os.chmod(path, 0o444)
    with norm_cache.folder_lock():
        with open(path) as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="symlinks as POSIX has them")
def test_entries_and_the_lock_are_never_followed_through_a_symlink(tmp_path, caplog):
    """Anyone who can write the cache folder (a shared one; root run with a user's HOME)
    could plant links there: an entry's link was read as the entry, then the file it named
    replaced by the entry's JSON, and a link at .lock created the file it named."""
    elsewhere = tmp_path / "elsewhere.json"  # a valid entry for the pair, outside the cache
    elsewhere.write_text(json.dumps({"format": norm_cache.FORMAT, "base": "b", "model": "m",
                                     "norms": {"k": 5.0}}))
    before = elsewhere.read_text()
    norm_cache.make_folder()
    path = norm_cache.entry_path("b", "m")
    os.symlink(elsewhere, path)
    os.symlink(tmp_path / "made-by-the-lock", os.path.join(norm_cache.cache_dir(), ".lock"))
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    assert norm_cache.load("b", "m") is None
    assert any("a symbolic link" in r.getMessage() for r in caplog.records)
    with norm_cache.folder_lock():
        norm_cache.store("b", "m", {"k": 1.0})
    assert elsewhere.read_text() == before and not os.path.islink(path)
    assert norm_cache.load("b", "m") == {"k": 1.0}
    assert not os.path.lexists(tmp_path / "made-by-the-lock")


def test_a_named_pipe_or_an_entry_nested_too_deeply_is_a_miss(caplog):
    """A FIFO at an entry's name blocked the merge forever (waiting for a writer); JSON
    nested beyond Python's recursion limit ended every merge of the pair in a RecursionError."""
    import threading

    norm_cache.make_folder()
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    path = norm_cache.entry_path("b", "pipe")
    if hasattr(os, "mkfifo"):
        os.mkfifo(path)
        got = []
        reader = threading.Thread(target=lambda: got.append(norm_cache.load("b", "pipe")), daemon=True)
        reader.start()
        reader.join(30)
        assert not reader.is_alive() and got == [None]
        norm_cache.store("b", "pipe", {"k": 2.0})  # replaced by a file
        assert norm_cache.load("b", "pipe") == {"k": 2.0}
    with open(norm_cache.entry_path("b", "deep"), "w") as f:
        f.write("[" * 200_000)
    assert norm_cache.load("b", "deep") is None
    assert any("nested too deeply" in r.getMessage() for r in caplog.records)
    folder = norm_cache.entry_path("b", "folder")  # a folder at an entry's name: named, no descriptor kept
    os.makedirs(folder)
    open_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(5):
        assert norm_cache.load("b", "folder") is None
    if open_before is not None:
        assert len(os.listdir("/proc/self/fd")) == open_before
    assert any(r.getMessage() == f"MetaGPT: ignoring unreadable norm cache entry {folder} (not a file); recomputing"
               for r in caplog.records)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_new_cache_folder_is_private_an_existing_one_keeps_its_mode(monkeypatch, tmp_path):
    """Entries name the models merged: a folder the cache makes is 0700 (it was 0755 with the
    usual umask); a team's folder made beforehand keeps its mode."""
    norm_cache.store("b", "m", {"k": 1.0})
    assert os.stat(norm_cache.cache_dir()).st_mode & 0o777 == 0o700
    shared = tmp_path / "team-cache"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(shared))
    norm_cache.store("b", "m", {"k": 1.0})
    assert os.stat(shared).st_mode & 0o7777 == 0o2775 and norm_cache.load("b", "m") == {"k": 1.0}


def test_unwritable_cache_warns_and_merges(llama_family, merge_options, tmp_path, monkeypatch, caplog):
    paths, _ = llama_family
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(blocker / "norms"))
    fresh_process_state()
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    run_recipe(recipe(paths, ["model0", "model1", "model2"]), str(tmp_path / "out"), merge_options)
    said = [r.getMessage() for r in caplog.records if "could not write the norm cache" in r.getMessage()]
    # once for the folder, not once for each of the run's entries (3 models, 3 pairs)
    assert len(said) == 1, said
    assert str(blocker / "norms") in said[0] and "MERGEKIT_METAGPT_CACHE_DIR" in said[0]
    assert any(name.endswith(".safetensors") for name in os.listdir(tmp_path / "out"))


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
    real = norms.task_vector_sums

    def interrupt_midway(*args, **kwargs):  # the norms of one task's models
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepass, "task_vector_sums", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)
    assert entries() == []
    assert not safetensors_in(str(tmp_path / "out"))  # interrupted before any weights


# -- the key changes whenever the content can have changed (issue: never stale) --------
def _middle_tensor_offset(path):
    """(name, absolute byte offset) of a tensor stored at least 64 KiB from both ends."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start = 8 + header_len + info["data_offsets"][0]
        end = 8 + header_len + info["data_offsets"][1]
        if start > 70_000 and size - end > 70_000 and info["dtype"] == "F32":
            return name, start
    raise AssertionError("no tensor in the middle of the file")


def test_rewritten_in_place_with_mtime_restored_misses(tmp_path, merge_options):
    """Same size, same header, same last 64 KiB, same mtime: only the middle changed."""
    from checkpoints import random_state_dict

    base = random_state_dict(11, intermediate_size=384)
    model = perturbed(base, 0.01, 1)
    paths = {
        "base": save_checkpoint(str(tmp_path / "base"), base, shard_size=None, intermediate_size=384),
        "m": save_checkpoint(str(tmp_path / "m"), model, shard_size=None, intermediate_size=384),
    }
    fresh_process_state()
    run_recipe(recipe(paths, ["m"]), str(tmp_path / "a"), merge_options)
    file = os.path.join(paths["m"], "model.safetensors")
    assert os.path.getsize(file) > 200_000
    name, offset = _middle_tensor_offset(file)
    before = os.stat(file)
    n = model[name].numel()
    changed = (base[name].float() + 0.5).contiguous()  # a much larger task vector there
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(changed.numpy().tobytes())
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(file).st_mtime_ns == before.st_mtime_ns and os.path.getsize(file) == before.st_size
    model[name] = changed.view(model[name].shape)

    fresh_process_state()
    runs = prepass.STATS.runs
    merged = run_recipe(recipe(paths, ["m"]), str(tmp_path / "b"), merge_options)
    assert prepass.STATS.runs == runs + 1, "the old entry was used"
    assert n > 0
    for key, tensor in model.items():  # one model: λ = 1, the merge is the model itself
        assert torch.allclose(merged[key], tensor, atol=1e-6), key


def test_a_small_file_rewritten_within_one_clock_tick_misses(tmp_path, monkeypatch):
    """Where the file system's clock is coarse (1-2 s), a same-size rewrite can keep every
    stat field; a small shard's data (under 64 KiB, past a header that stays the same) then
    went unread by the key. Small files count whole."""
    from safetensors.torch import save_file

    from mergekit_metagpt import fingerprint

    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(64, 64)}, path)
    frozen = os.stat(path)

    def key():  # as if every stat field stayed the same
        with monkeypatch.context() as patch:
            patch.setattr(fingerprint.os, "stat", lambda p, *a, **k: frozen)
            return fingerprint.file_key(path)

    before = key()
    save_file({"w": torch.ones(64, 64)}, path)  # same header, same size, other data
    assert os.path.getsize(path) == frozen.st_size
    assert key() != before


def test_a_hub_cache_blob_keeps_its_key_in_a_copy_of_the_cache_not_when_rewritten(tmp_path):
    """A hub blob is named by the hash of its content as huggingface_hub wrote it: a copy of
    the cache that keeps mtimes (cp -a, rsync -a) keeps the key. But `cp` onto the snapshot's
    symlink rewrites the blob under its old name: same size, same header, mtime put back
    (cp -p) and the key still changes."""
    import shutil

    from mergekit_metagpt.fingerprint import file_key

    header = json.dumps({"w": {"dtype": "F32", "shape": [100_000], "data_offsets": [0, 400_000]}}).encode()

    def weights(seed):
        return struct.pack("<Q", len(header)) + header + torch.randn(100_000, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()

    digest = "ab" * 32
    repo = tmp_path / "hub1" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(weights(0))
    (repo / "snapshots" / "rev").mkdir(parents=True)
    os.symlink(os.path.join("..", "..", "blobs", digest), repo / "snapshots" / "rev" / "model.safetensors")
    copy = tmp_path / "hub2" / "models--org--tiny"
    shutil.copytree(repo, copy, symlinks=True)  # copy2: mtimes kept, other inodes
    first = file_key(str(repo / "snapshots" / "rev" / "model.safetensors"))
    assert first.startswith("blob:")
    assert file_key(str(copy / "snapshots" / "rev" / "model.safetensors")) == first
    # the same layout outside a hub cache (a model folder unpacked from an archive): the
    # stricter key of any file, which a rewrite with its mtime put back misses
    unpacked = tmp_path / "unpacked" / "tiny"
    shutil.copytree(repo, unpacked, symlinks=True)
    assert file_key(str(unpacked / "snapshots" / "rev" / "model.safetensors")).startswith("file:")

    blob = repo / "blobs" / digest
    stat = os.stat(blob)
    with open(repo / "snapshots" / "rev" / "model.safetensors", "r+b") as f:  # through the link
        f.write(weights(1))
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(blob) == stat.st_size and os.stat(blob).st_mtime_ns == stat.st_mtime_ns
    assert file_key(str(repo / "snapshots" / "rev" / "model.safetensors")) != first
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"\x00" * 8)
    assert file_key(str(plain)).startswith("file:")


def _ties_trimmed_norm(delta: torch.Tensor, density: float) -> float:
    """Independent TIES trimming: keep the k = max(1, int(density * n)) largest |δ|."""
    flat = delta.double().reshape(-1)
    k = max(1, int(density * flat.numel()))
    kept = flat.abs().topk(k).values
    return float((kept ** 2).sum())


def test_sparse_norms_are_not_reused_across_variants(llama_family, merge_options, tmp_path):
    """metagpt_ties after metagpt_dare in one process (same densities): TIES's own λ."""
    from mergekit.io.tasks import LoaderCache

    paths, sds = llama_family
    models = ["model0", "model2"]
    params = {"density": 0.4, "lambda_from": "sparse"}
    fresh_process_state()
    run_recipe(recipe(paths, models, method="metagpt_dare", parameters=params), str(tmp_path / "dare"), merge_options)
    LoaderCache().flush_all()
    run_recipe(recipe(paths, models, method="metagpt_ties", parameters=params), str(tmp_path / "ties"), merge_options)
    with open(os.path.join(str(tmp_path / "ties"), "metagpt_coefficients.json")) as f:
        (merge,) = json.load(f)["merges"]
    expected = {
        paths[m]: sum(
            _ties_trimmed_norm(sds[m][k].double() - sds["base"][k].double(), 0.4)
            for k in sds["base"] if sds["base"][k].is_floating_point()
        )
        for m in models
    }
    for row in merge["models"]:
        assert abs(row["squared_norm"] - expected[row["model"]]) / expected[row["model"]] < 1e-5, row


def _offset_slices(paths):
    """One layer: the base's layer 1 against the fine-tunes' layer 0 (other pairs than a
    `models:` recipe reads, of the same tensor names of the fine-tunes)."""
    return {"merge_method": "metagpt", "base_model": paths["base"], "dtype": "float32",
            "slices": [{"sources": [{"model": paths["base"], "layer_range": [1, 2]},
                                    *({"model": paths[m], "layer_range": [0, 1]} for m in MODELS)]}]}


WARM_CASES = {
    # (the recipe that fills the cache, the recipe then run): what tells their reads apart
    "dtype": (lambda p: recipe(p, MODELS), lambda p: recipe(p, MODELS, dtype="bfloat16")),
    "the base's tensor": (lambda p: recipe(p, MODELS), _offset_slices),
    "dense then sparse": (lambda p: recipe(p, MODELS),
                          lambda p: recipe(p, MODELS, method="metagpt_ties",
                                           parameters={"density": 0.4, "lambda_from": "sparse"})),
}


@pytest.mark.parametrize("case", sorted(WARM_CASES))
def test_what_another_recipe_cached_never_changes_a_merges_norms(case, llama_family, merge_options, tmp_path,
                                                                 monkeypatch):
    """A recipe run after another of the same checkpoints (in the same process, and in a
    new one: memo, then disk) gets the norms it gets with an empty cache, where the two
    read other things under the same names: the inputs cast to another dtype, another
    tensor of the base against the same one of a model, sparsified task vectors."""
    from mergekit.io.tasks import LoaderCache

    paths, _ = llama_family
    first, then = (make(paths) for make in WARM_CASES[case])

    def norms_of(out):
        with open(os.path.join(out, "metagpt_coefficients.json")) as f:
            (entry,) = json.load(f)["merges"]
        return [(row["model"], row["squared_norm"]) for row in entry["models"]]

    def run(config, name):
        LoaderCache().flush_all()
        run_recipe(config, str(tmp_path / name), merge_options)
        return norms_of(str(tmp_path / name))

    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(tmp_path / "cold-cache"))
    fresh_process_state()
    cold = run(then, "cold")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", str(tmp_path / "warm-cache"))
    fresh_process_state()
    filled = run(first, "first")
    assert [n for _, n in filled] != pytest.approx([n for _, n in cold], rel=1e-6)  # they do read apart
    for name in ("memo", "disk"):
        if name == "disk":
            fresh_process_state()
        warm = run(then, name)
        assert [m for m, _ in warm] == [m for m, _ in cold]
        assert [n for _, n in warm] == pytest.approx([n for _, n in cold], rel=1e-12), name


@pytest.mark.parametrize("xdg, under", [("/somewhere/cache", "/somewhere/cache"), ("relative/cache", None),
                                        ("", None)])
def test_the_cache_folder_follows_xdg_cache_home_only_where_it_is_absolute(xdg, under, monkeypatch, tmp_path):
    """The XDG spec: a relative XDG_CACHE_HOME is ignored (else each folder a command runs in
    would get a cache of its own, and miss the others')."""
    monkeypatch.delenv("MERGEKIT_METAGPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = os.path.join(under or os.path.join(str(tmp_path), ".cache"), "mergekit-metagpt", "norms")
    assert norm_cache.cache_dir() == expected


@pytest.mark.parametrize("given, expected", [("~/norms", "home/norms"), ("rel/norms", "here/rel/norms"),
                                             ("{tmp}/abs", "abs")])
def test_a_cache_dir_given_with_a_tilde_or_relative_is_made_absolute(given, expected, monkeypatch, tmp_path):
    """MERGEKIT_METAGPT_CACHE_DIR="~/norms", as a shell leaves it quoted (.env files, Docker's
    ENV): the home's folder, not a folder named "~" in the current one."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE_DIR", given.format(tmp=tmp_path))
    assert norm_cache.cache_dir() == str(tmp_path / expected)
