"""The merge's record (metagpt_coefficients.json) and the λ tables in the model card.

Every test starts cold: its own norm cache folder (conftest) and an empty in-process
memo, so nothing here leans on norms an earlier test computed.
"""

import json
import logging
import os
import statistics
import threading

import pytest
import torch

from checkpoints import closed_form
from merging import recipe, run_mergekit_yaml, run_recipe, slices_recipe, write_yaml
from mergekit_metagpt import prepass
from mergekit_metagpt.cli import main

MODELS = ["model0", "model1", "model2"]
RECORD = "metagpt_coefficients.json"
CARD_MARK = "## MetaGPT coefficients"


def read_record(out):
    with open(os.path.join(out, RECORD)) as f:
        return json.load(f)


def read_card(out):
    with open(os.path.join(out, "README.md")) as f:
        return f.read()


def squared_norms(sds, models, names=None):
    """‖θ_t − θ₀‖² in float64 over `names` (default: every tensor)."""
    base = sds["base"]
    names = list(base) if names is None else names
    return [
        sum(float((sds[m][k].double() - base[k].double()).pow(2).sum()) for k in names)
        for m in models
    ]


def lambdas_of(norms):
    total = sum(norms)
    return [n / total for n in norms]


def card_rows(card, model):
    """(‖δ‖², λ) of each card table row for `model`, in card order."""
    rows = []
    for line in card.splitlines():
        if line.startswith(f"| {model} |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((float(cells[1]), float(cells[2])))
    return rows


# -- one record per run ----------------------------------------------------------------
def test_rerun_into_the_same_folder_leaves_one_record_of_the_last_run(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    assert len(read_record(out)["merges"][0]["models"]) == 3
    # the second run merges two models with another scale into the same folder
    run_recipe(recipe(paths, ["model0", "model1"], parameters={"lambda": 0.5}), out, merge_options)
    record = read_record(out)
    assert isinstance(record, dict) and record["format"] == 2
    (merge,) = record["merges"]
    assert merge["lambda"] == 0.5
    expected = lambdas_of(squared_norms(sds, ["model0", "model1"]))
    assert [m["model"] for m in merge["models"]] == [paths["model0"], paths["model1"]]
    for row, lam in zip(merge["models"], expected):
        assert abs(row["lambda"] - lam) < 1e-7
    card = read_card(out)
    assert card.count(CARD_MARK) == 1
    assert not card_rows(card, paths["model2"])  # the first run's table is gone


def test_a_later_merge_into_the_folder_removes_the_earlier_record(llama_family, merge_options, tmp_path):
    """A folder never holds λ that its model was not merged with: a later merge of
    another method into it leaves no record."""
    paths, _ = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    assert os.path.exists(os.path.join(out, RECORD))
    run_recipe(recipe(paths, ["model0", "model1"], method="task_arithmetic",
                      parameters={"weight": 0.5}), out, merge_options)
    assert not os.path.exists(os.path.join(out, RECORD))
    assert CARD_MARK not in read_card(out)


@pytest.mark.parametrize("broken", ["no weight", "no such model"])
def test_a_merge_of_another_method_that_mergekit_refuses_in_planning_keeps_the_earlier_record(
        broken, llama_family, merge_options, tmp_path):
    """A task_arithmetic recipe that mergekit refuses before its plan is made (a missing
    `weight`, a model not found) writes nothing: the earlier MetaGPT run's record stays beside its
    weights, as stock mergekit leaves the folder; once such a merge is planned, it goes."""
    paths, _ = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    record = read_record(out)
    if broken == "no weight":
        bad = recipe(paths, ["model0", "model1"], method="task_arithmetic")
    else:
        bad = recipe(dict(paths, gone=str(tmp_path / "gone")), ["model0", "gone"], method="task_arithmetic",
                     parameters={"weight": 0.5})
    with pytest.raises(Exception, match="Missing required parameter weight" if broken == "no weight" else "gone"):
        run_recipe(bad, out, merge_options)
    assert read_record(out) == record
    run_recipe(recipe(paths, ["model0", "model1"], method="task_arithmetic", parameters={"weight": 0.5}),
               out, merge_options)
    assert not os.path.exists(os.path.join(out, RECORD))


def test_without_the_task_universe_wrapper_another_methods_merge_still_removes_the_earlier_record(
        llama_family, merge_options, tmp_path, monkeypatch):
    """Where mergekit changed shape and the TaskUniverse wrapper is missing, the run_merge
    wrapper removes an earlier record before a merge of another method, as it did before
    it left that to the planned merge."""
    from mergekit.graph import TaskUniverse

    from mergekit_metagpt import integration

    paths, _ = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    assert os.path.exists(os.path.join(out, RECORD))
    assert TaskUniverse.__init__._mergekit_metagpt_wrapper
    monkeypatch.setattr(TaskUniverse, "__init__", TaskUniverse.__init__.__wrapped__)
    monkeypatch.delitem(integration._ATTACHED, "mergekit.graph")
    run_recipe(recipe(paths, ["model0", "model1"], method="task_arithmetic", parameters={"weight": 0.5}),
               out, merge_options)
    assert not os.path.exists(os.path.join(out, RECORD))


def test_a_merge_that_fails_before_writing_leaves_the_folder_as_it_was(llama_family, merge_options, tmp_path):
    """A MetaGPT merge refused in its pre-pass (NaN in a model) keeps the earlier run's
    record beside the earlier run's weights: the folder stays consistent."""
    from checkpoints import save_checkpoint
    from merging import safetensors_in

    paths, sds = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    record = read_record(out)
    broken = {k: v.clone() for k, v in sds["model1"].items()}
    broken["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    paths = dict(paths, nan=save_checkpoint(str(tmp_path / "nan"), broken))
    with pytest.raises(Exception, match="NaN or Inf"):
        run_recipe(recipe(paths, ["model0", "nan"]), out, merge_options)
    assert read_record(out) == record
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
    assert safetensors_in(out)


@pytest.mark.parametrize("stop, record_fails", [(KeyboardInterrupt, False), (OSError, False), (OSError, True)])
def test_a_merge_stopped_after_its_prepass_leaves_no_record(stop, record_fails, llama_family, merge_options,
                                                            tmp_path, monkeypatch, caplog):
    """Ctrl-C (or a full disk) mid-merge, after the pre-pass: the folder still holds the
    earlier run's finished model, partly overwritten, which neither the new λ nor the old
    describe; no record stays. While the weights are written, there is none either (the
    earlier run's went when the pre-pass ended, this run's comes once the model is written),
    so a merge killed then (SIGKILL, out of memory), which no wrapper outlives, leaves none."""
    from mergekit.io.tasks import SaveTensor

    from mergekit_metagpt import record

    paths, _ = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    if record_fails:
        def no_space(path, *args, **kwargs):
            raise OSError(28, "No space left on device", path)

        monkeypatch.setattr(record, "write_json", no_space)
    written = []

    def write_some(self, *args, **kwargs):
        assert not os.path.exists(os.path.join(self.writer_task.out_path, RECORD))  # neither λ describe it
        written.append(self)
        if len(written) > 3:
            raise stop("stopped mid-merge")
        return real_write(self, *args, **kwargs)

    real_write = SaveTensor.execute
    monkeypatch.setattr(SaveTensor, "execute", write_some)
    with pytest.raises(stop, match="stopped mid-merge"):
        run_recipe(recipe(paths, ["model0", "model1"]), out, merge_options)
    assert len(written) == 4  # the pre-pass ended before these tensors
    assert not os.path.exists(os.path.join(out, RECORD))
    # said without -v: the folder is not a usable model; rerun as it is only after Ctrl-C
    again = ("run the same command again (the norms are cached)" if stop is KeyboardInterrupt
             else "run it again once the error below is mended (the norms are cached)")
    assert [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and r.getMessage().startswith("MetaGPT: the merge stopped")] == [
        f"MetaGPT: the merge stopped after its pre-pass; {out} may hold part of this merge's weights, not a "
        f"usable model: {again}"]
    # into a fresh folder whose record could not be written: nothing to remove, still said
    caplog.clear()
    written.clear()
    fresh = str(tmp_path / "fresh")
    with pytest.raises(stop, match="stopped mid-merge"):
        run_recipe(recipe(paths, ["model0", "model1"]), fresh, merge_options)
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MetaGPT: the merge stopped")]
    assert stopped == [f"MetaGPT: the merge stopped after its pre-pass; {fresh} may hold part of this merge's "
                       f"weights, not a usable model: {again}"]


#: the WARNING of a merge whose model's files changed while it read them
CHANGED = ("MetaGPT: the files of {} changed while the merge read them: the merged weights may mix the old files "
           "and the new, and the λ may not be those of the files merged; no record written: run the merge again")


def _changed_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "changed while the merge read them" in r.getMessage()]


def test_a_model_rewritten_while_it_is_merged_leaves_no_record(llama_family, merge_options, tmp_path,
                                                                monkeypatch, caplog):
    """A shard replaced after the pre-pass read it (before the merge reads it): the weights
    may mix the old file and the new, and the λ are the old file's. No record and no λ in
    the card, and a WARNING names the model."""
    import glob
    import logging
    import shutil

    from mergekit.io.tasks import SaveTensor
    from safetensors.torch import load_file, save_file

    paths, _ = llama_family
    paths = dict(paths)
    for name in MODELS:
        paths[name] = shutil.copytree(paths[name], str(tmp_path / name))
    shard = sorted(glob.glob(os.path.join(paths["model1"], "*.safetensors")))[-1]
    real_write, rewritten = SaveTensor.execute, []

    def rewrite_first(self, *args, **kwargs):
        if not rewritten:  # once the pre-pass has read it, as the merge writes its first tensor
            save_file({k: v * 1.5 for k, v in load_file(shard).items()}, shard + ".new", metadata={"format": "pt"})
            os.replace(shard + ".new", shard)
            rewritten.append(shard)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(SaveTensor, "execute", rewrite_first)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    assert not os.path.exists(os.path.join(out, RECORD))
    assert CARD_MARK not in open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert _changed_warnings(caplog) == [CHANGED.format(paths['model1'])]


def _replace_by_rename(folder, state_dict, **kwargs):
    """Every file of the checkpoint in `folder` replaced by rename (as rsync, git or a hub
    download do): new files, new inodes, the old ones still open where they were."""
    import shutil

    from checkpoints import save_checkpoint

    staging = save_checkpoint(folder + ".staging", state_dict, **kwargs)
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    shutil.rmtree(staging)


def _next_merges_are_exact(paths, lams, merged, tmp_path, merge_options):
    """The next merge of MODELS, in this process (the memo) and in a new one (the disk
    cache), gives the closed form's λ and weights."""
    for fresh_process in (False, True):
        if fresh_process:
            prepass.clear_memo()
        again = str(tmp_path / f"again-{fresh_process}")
        result = run_recipe(recipe(paths, MODELS), again, merge_options)
        assert [row["lambda"] for row in read_record(again)["merges"][0]["models"]] == pytest.approx(lams, rel=1e-6)
        for key, value in merged.items():
            torch.testing.assert_close(result[key].double(), value, rtol=1e-5, atol=1e-6)


def _scaled_task_vector(sds, name, factor):
    base = sds["base"]
    return {k: base[k] + (v - base[k]) * factor for k, v in sds[name].items()}


@pytest.mark.parametrize("earlier_merge", [False, True], ids=["fresh-process", "loaders-kept-open"])
def test_a_model_replaced_before_its_pre_pass_caches_no_norms_of_it(llama_family, merge_options, tmp_path,
                                                                     monkeypatch, caplog, earlier_merge):
    """A model's files replaced by rename after the merge began (mergekit's loader holds
    its first shard, or an earlier merge's last one, open) and before the pre-pass reads
    them: the pre-pass would read part of the old files through the open shard and cache
    those norms under the new files' key, which every later merge would trust. The merge
    warns and writes no record, and caches nothing of the replaced model: the next merge of
    the new files is exact."""
    import shutil

    from checkpoints import save_checkpoint

    paths, sds = llama_family
    paths = dict(paths)
    for name in MODELS:
        paths[name] = shutil.copytree(paths[name], str(tmp_path / name))
    # in one file: the shard mergekit opened for the merge's first tensor holds every other
    paths["model1"] = save_checkpoint(str(tmp_path / "model1-whole"), sds["model1"], shard_size=None)
    if earlier_merge:  # mergekit keeps each model's loader, its last shard open
        run_recipe(recipe(paths, MODELS), str(tmp_path / "earlier"), merge_options)
    new = _scaled_task_vector(sds, "model1", 1.7)
    real_compute, replaced = prepass.compute, []

    def replace_first(run, *args, **kwargs):
        if not replaced:
            _replace_by_rename(paths["model1"], new, shard_size=None)
            replaced.append(True)
        return real_compute(run, *args, **kwargs)

    monkeypatch.setattr(prepass, "compute", replace_first)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    assert replaced
    assert not os.path.exists(os.path.join(out, RECORD))
    assert _changed_warnings(caplog) == [CHANGED.format(paths['model1'])]
    # the next merge, files unchanged, in this process (the memo) and in a new one (the disk cache)
    lams, merged = closed_form(sds["base"], [sds["model0"], new, sds["model2"]])
    _next_merges_are_exact(paths, lams, merged, tmp_path, merge_options)


def test_a_model_switched_to_another_cached_version_mid_merge_leaves_no_record(llama_family, merge_options,
                                                                                tmp_path, monkeypatch, caplog):
    """A model folder that is a symlink, switched between two versions whose norms are both
    cached after the merge began: mergekit read the first tensors from the old version, the
    pre-pass would find the new one's norms in the cache. No record of those λ; a warning."""
    paths, sds = llama_family
    paths = dict(paths)
    versions = {"v1": paths["model1"], "v2": save_checkpoint_of(_scaled_task_vector(sds, "model1", 1.7),
                                                                str(tmp_path / "v2"))}
    link = str(tmp_path / "model1")
    paths["model1"] = link

    def point_to(version):
        os.symlink(versions[version], link + ".new")
        os.replace(link + ".new", link)

    for version in ("v2", "v1"):  # both cached; the loader of v1 kept, its last shard open
        point_to(version)
        run_recipe(recipe(paths, MODELS), str(tmp_path / f"out-{version}"), merge_options)
    real_compute = prepass.compute

    def switch_first(run, *args, **kwargs):
        point_to("v2")
        return real_compute(run, *args, **kwargs)

    monkeypatch.setattr(prepass, "compute", switch_first)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    assert not os.path.exists(os.path.join(out, RECORD))
    assert _changed_warnings(caplog) == [CHANGED.format(link)]


def test_a_model_switched_while_its_pre_pass_reads_it_caches_no_norms_of_either_version(
        llama_family, merge_options, tmp_path, monkeypatch, caplog):
    """A model folder that is a symlink, switched to another version once the pre-pass has
    fingerprinted it and before it reads it: what it read is the new version's, which must
    not be cached under the old version's key (a later merge of the old version would take
    the new one's λ). A warning; the next merge of the old version is exact."""
    paths, sds = llama_family
    paths = dict(paths)
    v2 = _scaled_task_vector(sds, "model1", 1.7)
    versions = {"v1": paths["model1"], "v2": save_checkpoint_of(v2, str(tmp_path / "v2"))}
    link = str(tmp_path / "model1")
    paths["model1"] = link

    def point_to(version):
        os.symlink(versions[version], link + ".new")
        os.replace(link + ".new", link)

    point_to("v1")
    real_stream = prepass._stream

    def switch_first(*args, **kwargs):
        point_to("v2")
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(prepass, "_stream", switch_first)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    run_recipe(recipe(paths, MODELS), str(tmp_path / "switched"), merge_options)
    assert [r.getMessage() for r in caplog.records if "while the pre-pass read them" in r.getMessage()] == [
        f"MetaGPT: the files of {link} changed while the pre-pass read them: their norms are not written to "
        f"the norm cache"]
    monkeypatch.setattr(prepass, "_stream", real_stream)
    point_to("v1")
    lams, merged = closed_form(sds["base"], [sds[m] for m in MODELS])
    _next_merges_are_exact(paths, lams, merged, tmp_path, merge_options)


def save_checkpoint_of(state_dict, folder):
    from checkpoints import save_checkpoint

    return save_checkpoint(folder, state_dict)


def test_a_record_that_could_not_be_written_leaves_no_earlier_one(llama_family, merge_options, tmp_path,
                                                                    monkeypatch, caplog):
    """The merge goes on when its record cannot be written (a warning); the earlier run's
    record, which does not describe the new weights, goes."""
    import logging

    from mergekit_metagpt import record

    paths, _ = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)

    def no_space(path, *args, **kwargs):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(record, "write_json", no_space)
    caplog.set_level(logging.WARNING, logger="mergekit_metagpt")
    run_recipe(recipe(paths, ["model0", "model1"]), out, merge_options)
    assert any("could not write" in r.getMessage() and RECORD in r.getMessage() for r in caplog.records)
    assert not os.path.exists(os.path.join(out, RECORD))


# -- entry points that do not go through run_merge ------------------------------------
def _bin(name):
    import sys

    return os.path.join(os.path.dirname(sys.executable), name)


def _raw_files(sds, root):
    """Each model of the family as one raw safetensors file (mergekit-pytorch's inputs)."""
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    paths = {}
    for name in ["base", *MODELS]:
        paths[name] = os.path.join(root, f"{name}.safetensors")
        save_file({k: v.clone().contiguous() for k, v in sds[name].items()}, paths[name])
    return paths


def _mergekit_pytorch(config, out, tmp_path, name):
    import subprocess

    path = write_yaml(config, str(tmp_path / f"{name}.yml"))
    result = subprocess.run([_bin("mergekit-pytorch"), path, out, "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_mergekit_pytorch_stock_merge_removes_the_earlier_record(llama_family, tmp_path):
    """mergekit-pytorch never calls run_merge: the record of an earlier MetaGPT merge goes
    when the next merge's plan is made (a stock method), and a MetaGPT merge writes its own."""
    from safetensors.torch import load_file

    _, sds = llama_family
    raw = _raw_files(sds, str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    metagpt = {"merge_method": "metagpt", "base_model": raw["base"], "dtype": "float32",
               "models": [{"model": raw[m]} for m in MODELS]}
    linear = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": raw[m], "parameters": {"weight": 1.0}} for m in MODELS[:2]]}

    _mergekit_pytorch(metagpt, out, tmp_path, "metagpt")
    record = read_record(out)
    assert record["merge_method"] == "metagpt"
    expected = lambdas_of(squared_norms(sds, MODELS))
    assert [round(r["lambda"], 6) for r in record["merges"][0]["models"]] == [round(x, 6) for x in expected]

    _mergekit_pytorch(linear, out, tmp_path, "linear")
    assert not os.path.exists(os.path.join(out, RECORD))
    merged = load_file(os.path.join(out, "model.safetensors"))  # the linear merge is there
    name = "model.norm.weight"
    assert torch.allclose(merged[name], (sds["model0"][name] + sds["model1"][name]) / 2, atol=1e-6)

    _mergekit_pytorch(metagpt, out, tmp_path, "metagpt-again")
    assert read_record(out)["merge_method"] == "metagpt"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_mergekit_pytorch_stopped_mid_merge_leaves_no_record(stop, llama_family, tmp_path, monkeypatch):
    """mergekit-pytorch has no run_merge whose wrapper could remove the record of a merge
    stopped midway: its record is written once the last tensor is merged, so a merge stopped
    before leaves none (the earlier run's went when the plan was made)."""
    import click
    from mergekit.scripts.merge_raw_pytorch import main as mergekit_pytorch

    from mergekit_metagpt.method import MetaGPTMerge

    _, sds = llama_family
    raw = _raw_files(sds, str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    config = write_yaml({"merge_method": "metagpt", "base_model": raw["base"], "dtype": "float32",
                         "out_dtype": "float16", "models": [{"model": raw[m]} for m in MODELS]},
                        str(tmp_path / "r.yml"))
    merged = []
    merge = MetaGPTMerge.merge_with_lambdas

    def stopping(self, *args, **kwargs):
        if len(merged) == 5:
            raise stop("stopped")
        merged.append(1)
        return merge(self, *args, **kwargs)

    os.makedirs(out)
    with open(os.path.join(out, RECORD), "w") as f:
        f.write('{"merge_method": "metagpt", "earlier": true}')
    monkeypatch.setattr(MetaGPTMerge, "merge_with_lambdas", stopping)
    with pytest.raises((stop, click.exceptions.Abort)):  # click turns Ctrl-C into Abort
        mergekit_pytorch.main([config, out, "--quiet"], standalone_mode=False)
    assert len(merged) == 5 and not os.path.exists(os.path.join(out, RECORD))
    # the same merge run to its end writes it
    monkeypatch.setattr(MetaGPTMerge, "merge_with_lambdas", merge)
    prepass.clear_memo()
    mergekit_pytorch.main([config, out, "--quiet"], standalone_mode=False)
    expected = lambdas_of(squared_norms(sds, MODELS))
    record = read_record(out)
    lams = [row["lambda"] for row in record["merges"][0]["models"]]
    assert max(abs(a - b) for a, b in zip(lams, expected)) < 1e-7
    assert record["dtype"] == "float32" and record["out_dtype"] == "float16"  # from the plan, no run_merge


def test_mergekit_pytorch_that_fails_writing_the_model_leaves_no_record(llama_family, tmp_path, monkeypatch):
    """Every tensor merged, but mergekit cannot write the model (a full disk at its last
    shard): the record is written only once the model is, so none is left."""
    from mergekit.io.tensor_writer import TensorWriter
    from mergekit.scripts.merge_raw_pytorch import main as mergekit_pytorch

    _, sds = llama_family
    raw = _raw_files(sds, str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    config = write_yaml({"merge_method": "metagpt", "base_model": raw["base"], "dtype": "float32",
                         "models": [{"model": raw[m]} for m in MODELS]}, str(tmp_path / "r.yml"))

    def full_disk(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorWriter, "finalize", full_disk)
    with pytest.raises(OSError, match="No space left"):
        mergekit_pytorch.main([config, out, "--quiet"], standalone_mode=False)
    assert not os.path.exists(os.path.join(out, RECORD))


def test_mergekit_pytorch_without_the_finalize_wrapper_still_writes_the_record(
        llama_family, tmp_path, monkeypatch):
    """A FinalizeModel class without the plugin's wrapper (mergekit's module imported again,
    or changed): the record is written when the pre-pass ends, as before, not never."""
    from mergekit.io.tasks import FinalizeModel
    from mergekit.scripts.merge_raw_pytorch import main as mergekit_pytorch

    assert getattr(FinalizeModel.execute, "_mergekit_metagpt_wrapper", False)
    monkeypatch.setattr(FinalizeModel, "execute", FinalizeModel.execute.__wrapped__)
    _, sds = llama_family
    raw = _raw_files(sds, str(tmp_path / "raw"))
    out = str(tmp_path / "out")
    config = write_yaml({"merge_method": "metagpt", "base_model": raw["base"], "dtype": "float32",
                         "models": [{"model": raw[m]} for m in MODELS]}, str(tmp_path / "r.yml"))
    mergekit_pytorch.main([config, out, "--quiet"], standalone_mode=False)
    expected = lambdas_of(squared_norms(sds, MODELS))
    lams = [row["lambda"] for row in read_record(out)["merges"][0]["models"]]
    assert max(abs(a - b) for a, b in zip(lams, expected)) < 1e-7


def test_a_plan_that_writes_but_does_not_merge_leaves_the_record(tmp_path):
    """Only a merge's plan removes the record: a task universe with a tensor writer but no
    merge task (e.g. mergekit-extract-lora's) leaves the folder alone."""
    from mergekit.graph import TaskUniverse
    from mergekit.io.tasks import TensorWriterTask

    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, RECORD), "w") as f:
        f.write("{}")
    TaskUniverse([TensorWriterTask(out_path=out, max_shard_size=1 << 30)])
    assert os.path.exists(os.path.join(out, RECORD))


def test_mergekit_multi_stock_merge_removes_the_earlier_record(llama_family, merge_options, tmp_path):
    import subprocess

    paths, _ = llama_family
    out = str(tmp_path / "out")
    run_recipe(recipe(paths, MODELS), out, merge_options)
    assert os.path.exists(os.path.join(out, RECORD))
    config = write_yaml(recipe(paths, ["model0", "model1"], method="task_arithmetic",
                               parameters={"weight": 0.5}), str(tmp_path / "multi.yml"))
    result = subprocess.run(
        [_bin("mergekit-multi"), config, "--intermediate-dir", str(tmp_path / "inter"),
         "--out-path", out, "--no-lazy", "--no-copy-tokenizer", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, RECORD))
    assert CARD_MARK not in read_card(out)


# -- slices: one entry per model set -----------------------------------------------------


def slice_sets(sds):
    """Independently: which tensors each model set merges (mergekit takes the
    embeddings from the first slice's models and the final norm and lm_head from the
    last slice's), and the closed-form λ of each set."""
    names = list(sds["base"])
    first = [k for k in names if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"]
    second = [k for k in names if k not in first]
    assert any(k.startswith("model.layers.1.") for k in second) and "lm_head.weight" in second
    return [
        (["model0", "model1"], first, lambdas_of(squared_norms(sds, ["model0", "model1"], first)),
         squared_norms(sds, ["model0", "model1"], first)),
        (["model1", "model2"], second, lambdas_of(squared_norms(sds, ["model1", "model2"], second)),
         squared_norms(sds, ["model1", "model2"], second)),
    ]


def _markdown_tables(text):
    """Each table of `text` as rows of cells, split as GitHub splits them (not at an escaped bar)."""
    import re

    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def test_what_is_published_keeps_tables_whole_and_no_recipe_path(llama_family, merge_options, tmp_path):
    """A local folder may be named `ma|th`: unescaped, the bar split its cell, and the
    row's ‖δ‖² stood under λ (the real λ dropped), and the cosine table did not render."""
    paths, sds = llama_family
    named = dict(paths)
    for model, name in zip(MODELS, ("ma|th", "co*de", "chat")):
        named[model] = str(tmp_path / name)
        os.symlink(paths[model], named[model])
    config = recipe(named, MODELS)
    out = str(tmp_path / "out")
    run_recipe(config, out, merge_options)
    lams = lambdas_of(squared_norms(sds, MODELS))
    report = tmp_path / "inspect"
    assert main(["inspect", write_yaml(config, str(tmp_path / "r.yml")), str(report), "--no-pictures"]) == 0
    # inspect's files go into folders that are shared: the recipe by its name, not its path
    shown = json.loads((report / "metagpt-inspect.json").read_text())
    assert shown["recipe"] == "r.yml"
    from mergekit_metagpt.code_digest import code_digest

    assert shown["plugin_code_sha256"] == code_digest() == read_record(out)["plugin_code_sha256"]
    assert shown["dtype"] == read_record(out)["dtype"] == "float32" and shown["out_dtype"] is None
    for text in (read_card(out), (report / "metagpt-report.md").read_text(encoding="utf-8")):
        tables = _markdown_tables(text)
        assert len(tables) >= 2
        for rows in tables:
            assert rows[1][0] == "---" and all(len(row) == len(rows[0]) for row in rows), rows
        (lambda_table,) = [t for t in tables if t[0] == ["model", "‖δ‖²", "λ"]]
        got = {row[0].strip("`").replace("\\|", "|"): float(row[2]) for row in lambda_table[2:]}
        assert got == {named[m]: pytest.approx(lam, abs=1e-6) for m, lam in zip(MODELS, lams)}


def test_a_recipe_comment_with_the_sections_heading_does_not_keep_it_from_the_card(llama_family, merge_options,
                                                                                   tmp_path):
    """mergekit copies the recipe's text into the card: a comment reading as our heading
    is the recipe's, not our section."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    paths, sds = llama_family
    config = recipe(paths, MODELS[:2])
    text = CARD_MARK + "\n# (the λ are in the card)\n" + yaml.safe_dump(config)
    out = str(tmp_path / "out")
    run_merge(MergeConfiguration.model_validate(config), out, options=merge_options, config_source=text)
    card = read_card(out)
    assert card.count(CARD_MARK) == 2
    ((norm, lam),) = card_rows(card, paths["model0"])
    norms = squared_norms(sds, MODELS[:2])
    assert norm == pytest.approx(norms[0], rel=1e-6) and lam == pytest.approx(lambdas_of(norms)[0], abs=1e-6)


def test_a_card_section_cut_short_by_a_full_disk_is_taken_back(llama_family, merge_options, tmp_path,
                                                               monkeypatch, caplog):
    """A full disk while the λ section is appended to mergekit's card: the card stays as
    mergekit wrote it (it ended mid-sentence), with a warning; the record and merge stand."""
    import builtins

    from mergekit_metagpt import card as card_module

    paths, _ = llama_family
    wrote_part = []

    class FillsTheDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            wrote_part.append(len(text) // 2)
            raise OSError(28, "No space left on device")

    def open_filling(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FillsTheDisk(f) if "a" in mode else f

    monkeypatch.setattr(card_module, "open", open_filling, raising=False)
    out = str(tmp_path / "out")
    config = recipe(paths, MODELS[:2])
    with monkeypatch.context() as m:  # mergekit's own card, to compare with
        m.setattr(card_module, "add_card_sections", lambda context: None)
        run_recipe(config, str(tmp_path / "plain" / "out"), merge_options)  # the card's title: "out"
    run_recipe(config, out, merge_options)
    assert wrote_part and wrote_part[0] > 0
    assert read_card(out) == read_card(str(tmp_path / "plain" / "out"))
    assert CARD_MARK not in read_card(out)
    assert os.path.exists(os.path.join(out, RECORD))
    assert any(r.levelname == "WARNING" and "could not add the coefficients" in r.getMessage()
               and "No space left on device" in r.getMessage() for r in caplog.records)


def test_slices_record_and_card_have_one_entry_per_model_set(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    out = str(tmp_path / "out")
    run_recipe(slices_recipe(paths), out, merge_options)
    record = read_record(out)
    assert len(record["merges"]) == 2
    card = read_card(out)
    assert card.count(CARD_MARK) == 1
    assert "Model set 1 of 2" in card and "Model set 2 of 2" in card
    for entry, (models, names, lams, norms) in zip(record["merges"], slice_sets(sds)):
        assert entry["base_model"] == paths["base"] and entry["tensors"] == len(names)
        assert [m["model"] for m in entry["models"]] == [paths[m] for m in models]
        for row, lam, norm in zip(entry["models"], lams, norms):
            assert abs(row["lambda"] - lam) < 1e-6 and abs(row["squared_norm"] - norm) / norm < 1e-5
    # model1 is in both sets, with each set's own norm and λ, in set order
    (_, _, lams1, norms1), (_, _, lams2, norms2) = slice_sets(sds)
    rows = card_rows(card, paths["model1"])
    assert len(rows) == 2
    assert abs(rows[0][1] - lams1[1]) < 2e-6 and abs(rows[1][1] - lams2[0]) < 2e-6
    assert abs(rows[0][0] - norms1[1]) / norms1[1] < 1e-5 and abs(rows[1][0] - norms2[0]) / norms2[0] < 1e-5
    assert len(card_rows(card, paths["model0"])) == 1 and len(card_rows(card, paths["model2"])) == 1


# -- threads -----------------------------------------------------------------------------
def _in_thread(target, *args):
    errors = []

    def body():
        try:
            target(*args)
        except BaseException as error:  # noqa: BLE001 - reported to the test
            errors.append(error)

    thread = threading.Thread(target=body)
    return thread, errors


def test_run_merge_from_a_worker_thread_writes_record_and_card(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds[m] for m in MODELS])
    out = str(tmp_path / "out")
    thread, errors = _in_thread(run_recipe, recipe(paths, MODELS), out, merge_options)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors
    (merge,) = read_record(out)["merges"]
    for row, model, lam in zip(merge["models"], MODELS, lams):
        assert row["model"] == paths[model] and abs(row["lambda"] - lam) < 1e-7
    card = read_card(out)
    for model, lam in zip(MODELS, lams):
        (row,) = card_rows(card, paths[model])
        assert abs(row[1] - lam) < 2e-6


def test_two_concurrent_merges_each_write_their_own_record(llama_family, merge_options, tmp_path, monkeypatch):
    paths, sds = llama_family
    # both merges wait for each other inside their pre-pass: they really overlap
    barrier = threading.Barrier(2, timeout=120)
    original = prepass.compute

    def compute(*args, **kwargs):
        barrier.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(prepass, "compute", compute)
    jobs = {"a": ["model0", "model1"], "b": ["model1", "model2"]}
    threads = {}
    for name, models in jobs.items():
        threads[name] = _in_thread(run_recipe, recipe(paths, models), str(tmp_path / name), merge_options)
    for thread, _ in threads.values():
        thread.start()
    for name, (thread, errors) in threads.items():
        thread.join(timeout=300)
        assert not thread.is_alive() and not errors, (name, errors)
    for name, models in jobs.items():
        out = str(tmp_path / name)
        (merge,) = read_record(out)["merges"]
        assert [m["model"] for m in merge["models"]] == [paths[m] for m in models], name
        for row, lam in zip(merge["models"], lambdas_of(squared_norms(sds, models))):
            assert abs(row["lambda"] - lam) < 1e-7, name
        card = read_card(out)
        assert card.count(CARD_MARK) == 1
        for model in models:
            assert len(card_rows(card, paths[model])) == 1, (name, model)


def test_a_second_merge_into_a_folder_being_written_is_refused(llama_family, merge_options, tmp_path, monkeypatch):
    """Two merges into one folder at once would leave a mix of both runs' shards beside the
    record of whichever ended last: the second is refused at once, naming the folder, and
    writes nothing; the first merges to the closed form; once it ended, the folder is free,
    even while a child process forked during the merge lives on."""
    import fcntl
    import multiprocessing
    import time

    from mergekit_metagpt.errors import MetaGPTError

    paths, sds = llama_family
    out = str(tmp_path / "out")
    original, second = prepass.compute, []

    seen, children = [], []

    def compute(*args, **kwargs):
        if not second:  # the first merge is in its pre-pass: the second starts now
            thread, errors = _in_thread(run_recipe, recipe(paths, ["model1", "model2"]), out, merge_options)
            second.append(errors)
            thread.start()
            thread.join(timeout=300)
            seen.append(sorted(os.listdir(out)))
            # a child forked now (a multiprocessing pool) outlives the merge: it must not keep the lock
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=True)
            child.start()
            children.append(child)
        return original(*args, **kwargs)

    from mergekit_metagpt import planning

    checked, check_models_open = [], planning.check_models_open

    def counted_check(*args, **kwargs):  # opens every loader, may merge a LoRA: not for a refused merge
        checked.append(threading.current_thread().name)
        return check_models_open(*args, **kwargs)

    monkeypatch.setattr(planning, "check_models_open", counted_check)
    monkeypatch.setattr(prepass, "compute", compute)
    try:
        merged = run_recipe(recipe(paths, MODELS), out, merge_options)
        monkeypatch.setattr(prepass, "compute", original)
        assert children[0].is_alive()
        run_recipe(recipe(paths, MODELS), str(tmp_path / "out"), merge_options)  # the folder is free
    finally:
        for child in children:
            child.kill()
            child.join(30)
    assert seen == [[]]  # the second merge wrote nothing there (the first had not yet either)
    assert checked == [threading.current_thread().name] * 2  # the refused one checked nothing first
    (errors,) = second
    assert len(errors) == 1 and isinstance(errors[0], MetaGPTError), errors
    assert str(errors[0]) == (f"another MetaGPT merge is writing into {out} now (in this process or another): its "
                              f"weights and yours would mix; wait for it to end, or merge into another folder")
    lams, reference = closed_form(sds["base"], [sds[m] for m in MODELS])
    assert [row["lambda"] for row in read_record(out)["merges"][0]["models"]] == pytest.approx(lams, rel=1e-6)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key].double(), value, rtol=1e-5, atol=1e-6)
    handle = os.open(out, os.O_RDONLY)  # released
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(handle)


# -- per_tensor --------------------------------------------------------------------------
def test_per_tensor_record_gives_each_models_lambda_spread(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    out = str(tmp_path / "out")
    merged = run_recipe(recipe(paths, MODELS, parameters={"granularity": "per_tensor"}), out, merge_options)
    (merge,) = read_record(out)["merges"]
    assert merge["granularity"] == "per_tensor"
    names = list(sds["base"])
    # independent closed form: per tensor, λ_t = ‖δ_t‖² / Σ_k ‖δ_k‖² of that tensor alone
    per_tensor = {m: [] for m in MODELS}
    base = sds["base"]
    for name in names:
        norms = squared_norms(sds, MODELS, [name])
        expected = base[name].double().clone()
        for model, lam in zip(MODELS, lambdas_of(norms)):
            per_tensor[model].append(lam)
            expected += lam * (sds[model][name].double() - base[name].double())
        # the weights too: each tensor merged with its own λ
        assert (merged[name].double() - expected).abs().max().item() < 1e-6, name
    assert merge["tensors"] == len(names)
    card = read_card(out)
    assert "λ per tensor: min / median / max" in card
    for row, model in zip(merge["models"], MODELS):
        spread = row["lambda_per_tensor"]
        values = per_tensor[model]
        expected = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        for key in ("min", "median", "max"):
            assert abs(spread[key] - expected[key]) < 1e-6, (model, key, spread, expected)
        assert spread["min"] < spread["max"]  # the tensors really differ
        card_line = next(l for l in card.splitlines() if l.startswith(f"| {paths[model]} |"))
        assert f"{expected['median']:.6f}" in card_line


def test_mixed_granularity_record_gives_the_spread_of_the_per_tensor_ones(llama_family, merge_options, tmp_path):
    """granularity per_tensor on the MLP tensors only: the record's lambda_per_tensor is over
    those tensors (and says how many), the card's and coefficients' tables say "N of M"
    (the spread was left out: the record said only the whole set's λ)."""
    from mergekit_metagpt.cli import coefficients_text

    paths, sds = llama_family
    out = str(tmp_path / "out")
    granularity = [{"filter": "mlp", "value": "per_tensor"}, {"value": "global"}]
    run_recipe(recipe(paths, MODELS, parameters={"granularity": granularity}), out, merge_options)
    record = read_record(out)
    (merge,) = record["merges"]
    assert merge["granularity"] == ["global", "per_tensor"]
    names = list(sds["base"])
    mlp = [n for n in names if ".mlp." in n]
    per_tensor = {m: [] for m in MODELS}
    for name in mlp:
        for model, lam in zip(MODELS, lambdas_of(squared_norms(sds, MODELS, [name]))):
            per_tensor[model].append(lam)
    for row, model in zip(merge["models"], MODELS):
        spread = row["lambda_per_tensor"]
        values = per_tensor[model]
        assert spread["tensors"] == len(mlp) < len(names)
        for key, want in (("min", min(values)), ("median", statistics.median(values)), ("max", max(values))):
            assert abs(spread[key] - want) < 1e-6, (model, key, spread)
    header = f"λ per tensor ({len(mlp)} of {len(names)} tensors): min / median / max"
    assert header in read_card(out)
    assert f"lambda per tensor ({len(mlp)} of {len(names)} tensors)" in coefficients_text(record)


# -- lambda_from: sparse -----------------------------------------------------------------
def trimmed_norms(sds, models, densities):
    """‖TIES-trimmed δ‖²: per tensor the k = max(1, int(density·numel)) largest |δ|, no rescale."""
    base = sds["base"]
    out = []
    for model in models:
        total = 0.0
        for name in base:
            delta = (sds[model][name].double() - base[name].double()).reshape(-1)
            k = max(1, int(densities[model] * delta.numel()))
            total += float(delta.abs().topk(k).values.pow(2).sum())
        out.append(total)
    return out


def test_sparse_record_and_card_say_the_norms_are_of_the_sparsified_vectors(llama_family, merge_options, tmp_path):
    paths, sds = llama_family
    models = ["model0", "model1"]
    densities = {"model0": 0.3, "model1": 0.7}
    config = recipe(paths, models, method="metagpt_ties", parameters={"lambda_from": "sparse"})
    config["models"] = [{"model": paths[m], "parameters": {"density": densities[m]}} for m in models]
    out = str(tmp_path / "out")
    run_recipe(config, out, merge_options)
    record = read_record(out)
    assert "sparsified" in record["norms"]
    (merge,) = record["merges"]
    assert merge["lambda_from"] == "sparse"
    assert merge["density"] == {paths[m]: densities[m] for m in models}
    expected = trimmed_norms(sds, models, densities)
    for row, norm, lam in zip(merge["models"], expected, lambdas_of(expected)):
        assert abs(row["squared_norm"] - norm) / norm < 1e-5 and abs(row["lambda"] - lam) < 1e-6
    card = read_card(out)
    assert "the norms are of the sparsified task vectors" in card
    # no cosine is computed of sparsified vectors: the card says so, without a table of dashes
    assert "Cosine similarities not available" in card and "| – |" not in card
    # and a dense run of the same recipe says nothing of the kind
    dense = str(tmp_path / "dense")
    config["parameters"] = {"lambda_from": "dense"}
    run_recipe(config, dense, merge_options)
    assert "sparsified" not in read_record(dense)["norms"]
    assert "sparsified" not in read_card(dense)


# -- the record and `coefficients --json` are one shape ----------------------------------
FIELDS = {"format", "merge_method", "paper", "plugin_version", "plugin_code_sha256", "dtype", "out_dtype",
          "random_seed", "norms", "merges", "passed_through"}
ENTRY_FIELDS = {"cosine_similarity", "base_model", "tensors", "granularity", "lambda", "alpha", "lambda_from", "density",
                "int8_mask", "models"}


def test_record_and_coefficients_json_have_the_same_fields(llama_family, merge_options, tmp_path, capsys):
    from mergekit_metagpt import __version__
    from mergekit_metagpt.code_digest import code_digest

    paths, sds = llama_family
    config = recipe(paths, MODELS, method="metagpt_ties", parameters={"lambda": 0.7, "int8_mask": True})
    config["models"] = [{"model": paths[m], "parameters": {"density": d}} for m, d in zip(MODELS, (0.4, 0.5, 0.6))]
    path = write_yaml(config, str(tmp_path / "r.yml"))
    assert main(["coefficients", path, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    prepass.clear_memo()
    out = str(tmp_path / "out")
    run_recipe(config, out, merge_options)
    record = read_record(out)
    assert set(record) == set(printed) == FIELDS
    for data in (record, printed):
        assert data["merge_method"] == "metagpt_ties" and data["dtype"] == "float32" and data["out_dtype"] is None
        assert data["plugin_version"] == __version__ and data["format"] == 2 and data["random_seed"] is None
        assert data["plugin_code_sha256"] == code_digest()
        (entry,) = data["merges"]
        assert data["passed_through"] == []
        assert set(entry) == ENTRY_FIELDS
        cosine = entry["cosine_similarity"]
        assert cosine["models"] == [paths[m] for m in MODELS] and cosine["note"] is None
        assert all(v is not None for row in cosine["matrix"] for v in row)
        assert entry["base_model"] == paths["base"] and entry["lambda"] == 0.7 and entry["alpha"] == 1.0
        assert entry["granularity"] == "global" and entry["lambda_from"] == "dense" and entry["int8_mask"] is True
        assert entry["density"] == {paths[m]: d for m, d in zip(MODELS, (0.4, 0.5, 0.6))}
        lams = lambdas_of(squared_norms(sds, MODELS))
        for row, model, lam in zip(entry["models"], MODELS, lams):
            assert set(row) == {"model", "squared_norm", "lambda"}
            assert row["model"] == paths[model] and abs(row["lambda"] - lam) < 1e-7
    # the same numbers, not just the same fields
    for a, b in zip(record["merges"][0]["models"], printed["merges"][0]["models"]):
        assert a["model"] == b["model"] and a["squared_norm"] == pytest.approx(b["squared_norm"], rel=1e-9)
    assert {k: v for k, v in record.items() if k != "merges"} == {k: v for k, v in printed.items() if k != "merges"}


def test_record_gives_the_seed_that_drew_dares_masks(llama_family, tmp_path):
    """The λ of lambda_from: sparse (and any DARE merge) are one draw of the masks: the
    record gives the seed that draws them again, and two seeds give two draws."""
    from mergekit.options import MergeOptions

    paths, _ = llama_family
    config = recipe(paths, MODELS, method="metagpt_dare", parameters={"density": 0.5, "lambda_from": "sparse"})
    records = {}
    for seed in (3, 4):
        out = str(tmp_path / f"out{seed}")
        run_recipe(config, out, MergeOptions(copy_tokenizer=False, quiet=True, random_seed=seed))
        records[seed] = read_record(out)
        assert records[seed]["random_seed"] == seed
        assert f"drawn as by `mergekit-yaml --random-seed {seed}`" in read_card(out)
    assert records[3]["merges"][0]["models"][0]["lambda"] != records[4]["merges"][0]["models"][0]["lambda"]


def test_record_gives_the_out_dtype_the_weights_were_written_in(llama_family, tmp_path, capsys):
    paths, _ = llama_family
    config = dict(recipe(paths, MODELS[:2]), out_dtype="float16")
    assert main(["coefficients", write_yaml(config, str(tmp_path / "r.yml")), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dtype"] == "float32" and printed["out_dtype"] == "float16"


def test_a_value_that_varies_is_listed_once_per_value_in_numeric_order():
    """A gradient's interpolation gives one value as 0.5666666666666665 and ...667."""
    from mergekit_metagpt.record import _uniform

    assert _uniform([0.5666666666666665, 0.5666666666666667]) == 0.5666666666666665  # as given
    assert _uniform([1 / 3, 1 / 3]) == 1 / 3
    assert _uniform([10.0, 0.5666666666666665, 9.0, 0.5666666666666667]) == [0.5666666666666665, 9.0, 10.0]
    assert _uniform(["sparse", "dense", "sparse"]) == ["dense", "sparse"]
    assert _uniform([True, 1, True]) == [1, True]  # a bool is not the number 1


@pytest.mark.parametrize("method, parameters, flags", [
    ("metagpt_dare", {"rescale": False}, {"rescale": False}),
    ("metagpt_dare", {}, {"rescale": True}),
    ("metagpt_ties", {}, {"int8_mask": False}),
    ("metagpt_dare_ties", {"int8_mask": True}, {"int8_mask": True, "rescale": True}),
    ("metagpt", {}, {}),
])
def test_record_says_how_the_variant_sparsified(method, parameters, flags, llama_family, tmp_path, capsys):
    """`rescale` (DARE) and `int8_mask` (TIES) change the merge; the record gives them as the
    merge took them, and only for the variant that takes them."""
    paths, _ = llama_family
    if method != "metagpt":
        parameters = dict(parameters, density=0.5)
    config = recipe(paths, MODELS[:2], method=method, parameters=parameters)
    assert main(["coefficients", write_yaml(config, str(tmp_path / "r.yml")), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["merges"]
    assert {k: entry[k] for k in ("rescale", "int8_mask") if k in entry} == flags


@pytest.mark.parametrize("stray", ['[]', '{"merges": 5}', '{"merges": [3, {"models": [], "lambdas": "x"}]}'])
def test_a_stray_inspect_file_in_the_output_folder_does_not_fail_the_merge(stray, llama_family, merge_options,
                                                                           tmp_path):
    """The card looks for `inspect`'s pictures through its JSON file; one that is not
    inspect's (here: other shapes) means no pictures, not a failed merge after the weights."""
    paths, sds = llama_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "metagpt-inspect.json").write_text(stray)
    run_recipe(recipe(paths, MODELS), str(out), merge_options)
    card = read_card(str(out))
    assert card.count(CARD_MARK) == 1 and "![" not in card.split(CARD_MARK)[1]
    expected = lambdas_of(squared_norms(sds, MODELS))
    assert [lam for _, lam in card_rows(card, paths["model0"])] == [pytest.approx(expected[0], abs=1e-6)]


def test_a_recipe_lambda_is_said_beside_the_shares_it_scales(llama_family, merge_options, tmp_path, caplog, capsys):
    """The tables' λ are shares summing to 1; a recipe's `lambda: 0.5` halves what the merge
    adds. The log, the card and `coefficients` say so beside them (a reader took 0.76 for the
    weight applied); with lambda 1, nothing is added."""
    import logging

    from mergekit_metagpt.cli import main

    paths, _ = llama_family
    out = str(tmp_path / "out")
    config = recipe(paths, MODELS, parameters={"lambda": 0.5})
    with caplog.at_level(logging.INFO, logger="mergekit_metagpt"):
        run_recipe(config, out, merge_options)
    said = "lambda: 0.5 (the recipe's scale): the merge adds lambda x lambda_t x delta_t"
    assert f"MetaGPT: {said}" in [r.getMessage() for r in caplog.records]
    assert "`lambda: 0.5` (the recipe's scale): the merge adds lambda · λ_t · δ_t, not λ_t · δ_t." in read_card(out)
    assert main(["coefficients", write_yaml(config, str(tmp_path / "r.yml"))]) == 0
    assert said in capsys.readouterr().out
    plain = str(tmp_path / "plain")
    run_recipe(recipe(paths, MODELS), plain, merge_options)
    assert "the recipe's scale" not in read_card(plain)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_files_written_whole_take_the_umask_set_later_in_the_process(tmp_path):
    """The record, baked recipe and cache entries are written to a new file then renamed: the
    new file took the umask read when the plugin was imported, so a notebook's later
    ``os.umask(0o077)`` left metagpt_coefficients.json readable by all (0644) where open()
    made 0600. A file replaced keeps its own mode."""
    from mergekit_metagpt.atomic_files import write_json

    earlier = os.umask(0o077)
    try:
        write_json(str(tmp_path / "private.json"), {"a": 1})
        os.umask(0o022)
        write_json(str(tmp_path / "public.json"), {"a": 1})
        (tmp_path / "kept.json").write_text("{}")
        os.chmod(tmp_path / "kept.json", 0o640)
        os.umask(0o077)
        write_json(str(tmp_path / "kept.json"), {"a": 2})
    finally:
        os.umask(earlier)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("private.json", "public.json", "kept.json")}
    assert modes == {"private.json": 0o600, "public.json": 0o644, "kept.json": 0o640}
    assert json.loads((tmp_path / "kept.json").read_text()) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["kept.json", "private.json", "public.json"]


def test_control_characters_and_line_breaks_of_a_recipe_are_escaped_where_shown(llama_family, merge_options,
                                                                                 tmp_path, capfd, caplog):
    """A recipe's strings reached the terminal and the card as written: an unknown parameter's
    name with a terminal's escape sequences (retitle, clear) was printed raw by the error line,
    before any model was read; a folder whose name holds a line break and '## …' made a
    heading of its own in the card's verdict, and its ESC reached the λ table."""
    import shutil

    from mergekit_metagpt.cli import main as cli_main

    paths, _ = llama_family
    caplog.set_level(logging.INFO, logger="mergekit_metagpt")
    evil = "lamda\x1b]0;TITLE\x07\x1b[2J\u202e"
    path = write_yaml({**recipe(paths, ["model0", "model1"]), "parameters": {evil: 0.5}}, str(tmp_path / "r.yml"))
    capfd.readouterr()
    assert cli_main(["coefficients", path]) == 1
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert "lamda\\x1b]0;TITLE\\x07\\x1b[2J\\u202e" in err, err
    result = run_mergekit_yaml(path, str(tmp_path / "refused"))
    assert result.returncode == 1 and "\x1b" not in result.stderr and "\u202e" not in result.stderr
    assert "lamda\\x1b]0;TITLE\\x07\\x1b[2J\\u202e" in result.stderr.splitlines()[-1], result.stderr
    odd = str(tmp_path / "math\n##Injected\x1b[31mred")  # (mergekit cannot serialise a space)
    shutil.copytree(paths["model1"], odd)
    paths = {**paths, "odd": odd}
    capfd.readouterr()
    assert cli_main(["coefficients", write_yaml(recipe(paths, ["model0", "odd"]), str(tmp_path / "o.yml"))]) == 0
    out = capfd.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred" in out, out
    run_recipe(recipe(paths, ["model0", "odd"]), str(tmp_path / "out"), merge_options)
    card = (tmp_path / "out" / "README.md").read_text()
    section = card[card.index("MetaGPT coefficients"):]
    assert "\x1b" not in section and "\\x1b[31mred" in section
    assert not any(l.startswith("##Injected") for l in section.splitlines()), section
    # the log's lines (the summary, "norms … from the norm cache", the verdict), stock
    # mergekit-yaml's one-line summary, and a refusal that names the folder: one Error: line
    assert not [r.getMessage() for r in caplog.records if "\x1b" in r.getMessage()]
    assert any("\\x1b[31mred" in r.getMessage() for r in caplog.records)
    import subprocess
    import sys

    merged = subprocess.run(  # not --quiet: its one-line summary
        [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
         write_yaml(recipe(paths, ["model0", "odd"]), str(tmp_path / "y.yml")), str(tmp_path / "yaml-out"),
         "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, MERGEKIT_METAGPT_PROGRESS="1"))
    assert merged.returncode == 0 and "MetaGPT λ: " in merged.stderr and "\x1b" not in merged.stderr, merged.stderr
    twice = {**recipe(paths, ["model0"]), "models": [{"model": odd}, {"model": odd + "/./"}]}
    refused = run_mergekit_yaml(write_yaml(twice, str(tmp_path / "t.yml")), str(tmp_path / "t-out"))
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and last.startswith("Error: MetaGPT: models ") and "are one checkpoint" in last


def test_a_folder_that_takes_no_change_is_warned_of_only_where_a_record_is_there(tmp_path, monkeypatch, caplog):
    """On a read-only mount, removing a file fails with EROFS whether or not it is there: a
    merge of any method into a fresh folder there (stock task_arithmetic's too) says nothing
    of an earlier run's record that does not exist; one that is there is named."""
    import errno

    from mergekit_metagpt.record import RECORD_NAME, remove_stale_record

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "remove", read_only)
    with caplog.at_level(logging.INFO, logger="mergekit_metagpt"):
        remove_stale_record(str(tmp_path))
    assert caplog.records == []
    (tmp_path / RECORD_NAME).write_text("{}")
    with caplog.at_level(logging.INFO, logger="mergekit_metagpt"):
        remove_stale_record(str(tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        f"MetaGPT: could not remove the earlier run's {tmp_path / RECORD_NAME}: [Errno 30] Read-only file system: "
        f"'{tmp_path / RECORD_NAME}'"]


@pytest.mark.parametrize("spelling", ["alike", "otherwise"])
def test_one_model_set_written_otherwise_in_two_slices_is_warned_of(spelling, llama_family, tmp_path, merge_options,
                                                                    caplog):
    """mergekit tells model sets apart by how paths are written: the same base and models
    written ./m in one slice and ./m/ in another make two sets with λ of their own, where
    written alike they make one: a warning names both sets."""
    paths, _ = llama_family
    data = slices_recipe(paths)
    for source in data["slices"][1]["sources"]:  # the first slice's models in the second too
        source["model"] = {"base": paths["base"], "model1": paths["model0"], "model2": paths["model1"]}[
            next(k for k, p in paths.items() if p == source["model"])]
        if spelling == "otherwise" and source["model"] == paths["model1"]:
            source["model"] += "/"
    prepass.clear_memo()
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
        run_recipe(data, str(tmp_path / "out"), merge_options)
    with open(tmp_path / "out" / "metagpt_coefficients.json") as f:
        record = json.load(f)
    warned = [r.getMessage() for r in caplog.records if "written otherwise" in r.getMessage()]
    if spelling == "alike":
        assert len(record["merges"]) == 1 and warned == [], warned
    else:
        assert len(record["merges"]) == 2, record["merges"]
        assert warned == [
            f"MetaGPT: model sets 1 (base {paths['base']}, models {paths['model0']}, {paths['model1']}) and 2 (base "
            f"{paths['base']}, models {paths['model0']}, {paths['model1']}/) are the same checkpoints written "
            f"otherwise: mergekit plans them apart, so each gets λ of its own over its own tensors; write the paths "
            f"alike in every slice and module for one λ over all of them"], warned
