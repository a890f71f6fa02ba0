"""Task-vector diagnostics: inner products in the pre-pass, `inspect`, the log and the card.

Reference numbers are computed here independently, in float64, from the state dicts."""

import json
import os

import pytest
import torch

from checkpoints import random_state_dict, save_checkpoint
from merging import recipe, run_mergekit_yaml, run_recipe, write_yaml
from mergekit_metagpt import prepass

MODELS = ["model0", "model1", "model2"]
# (noise scale, weight of a direction model0 and model1 share): model0·model1 ≈ 0.5
MIX = [(0.01, 1.0), (0.03, 1.0), (0.02, 0.0)]


@pytest.fixture(scope="module")
def aligned_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    base = random_state_dict(3)
    gen = torch.Generator().manual_seed(7)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    paths = {"base": save_checkpoint(str(root / "base"), base)}
    sds = {"base": base}
    for name, (scale, weight) in zip(MODELS, MIX):
        own = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
        sds[name] = {k: base[k] + scale * (own[k] + weight * shared[k]) for k in base}
        paths[name] = save_checkpoint(str(root / name), sds[name])
    return paths, sds


def column(name: str) -> str:
    """Layer of a LLaMA tensor name, written out here (not the plugin's regex)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return parts[2]
    if parts[:2] == ["model", "embed_tokens"]:
        return "embed"
    if parts[0] == "lm_head":
        return "head"
    return "other"


def reference(sds):
    """float64: ‖δ‖² per model, ⟨δ_a, δ_b⟩, cosines, ‖δ‖² per layer and per-layer cosines."""
    base = sds["base"]
    deltas = {m: {k: sds[m][k].double() - base[k].double() for k in base} for m in MODELS}
    layers = sorted({column(k) for k in base})
    norms = {m: sum(float(d.pow(2).sum()) for d in deltas[m].values()) for m in MODELS}
    layer_norms = {m: {c: sum(float(d.pow(2).sum()) for k, d in deltas[m].items() if column(k) == c) for c in layers}
                   for m in MODELS}
    cos, layer_cos = {}, {}
    for i, a in enumerate(MODELS):
        for b in MODELS[i + 1:]:
            dot = sum(float((deltas[a][k] * deltas[b][k]).sum()) for k in base)
            cos[(a, b)] = dot / (norms[a] * norms[b]) ** 0.5
            for c in layers:
                dot = sum(float((deltas[a][k] * deltas[b][k]).sum()) for k in base if column(k) == c)
                layer_cos[(a, b, c)] = dot / (layer_norms[a][c] * layer_norms[b][c]) ** 0.5
    top = {m: sorted(base, key=lambda k: -float(deltas[m][k].pow(2).sum()))[:5] for m in MODELS}
    return norms, cos, layer_norms, layer_cos, top


def close(got, want, rel=1e-6):
    return abs(got - want) <= rel * abs(want)


def inspect(recipe_path, out_dir, *flags):
    from mergekit_metagpt.cli import main

    return main(["inspect", recipe_path, out_dir, *flags])


def test_inspect_writes_report_json_and_pictures_that_match_float64(aligned_family, tmp_path, capsys):
    from PIL import Image

    paths, sds = aligned_family
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    out = str(tmp_path / "inspect")
    assert inspect(config, out, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    with open(os.path.join(out, "metagpt-inspect.json")) as f:
        data = json.load(f)
    assert printed["merges"] == data["merges"]
    (entry,) = data["merges"]
    norms, cos, layer_norms, layer_cos, top = reference(sds)
    names = [paths[m] for m in MODELS]
    assert entry["models"] == names
    total = sum(norms.values())
    for i, m in enumerate(MODELS):
        assert close(entry["squared_norms"][i], norms[m])
        assert close(entry["lambdas"][i], norms[m] / total)
        assert [t["tensor"] for t in entry["top_tensors"][names[i]]] == top[m]
        for j, layer in enumerate(entry["layers"]):
            assert close(entry["layer_squared_norms"][i][j], layer_norms[m][layer])
    assert entry["layers"] == ["embed", "0", "1", "other", "head"]
    for (a, b), want in cos.items():
        i, j = MODELS.index(a), MODELS.index(b)
        assert close(entry["cosine"][i][j], want) and close(entry["cosine"][j][i], want)
        for k, layer in enumerate(entry["layers"]):
            got = entry["layer_cosine"][f"{paths[a]} | {paths[b]}"][k]
            assert close(got, layer_cos[(a, b, layer)], rel=1e-5), (a, b, layer)
    assert cos[("model0", "model1")] > 0.4  # the family is built so; the verdict says so
    assert "far from orthogonal" in entry["verdict"] and "model0 and model1" in entry["verdict"]

    report = open(os.path.join(out, "metagpt-report.md")).read()
    assert f"{cos[('model0', 'model1')]:+.4f}" in report and "far from orthogonal" in report
    assert "![cosine matrix](metagpt-cosines.png)" in report
    # 100 dpi, cropped to what is drawn: about the figure sizes (3 models, 5 layer columns)
    for name, size in (("metagpt-layer-norms.png", (800, 385)), ("metagpt-lambdas.png", (600, 400)),
                       ("metagpt-cosines.png", (670, 570))):
        with Image.open(os.path.join(out, name)) as image:
            image.verify()
        with Image.open(os.path.join(out, name)) as image:
            assert image.format == "PNG", name
            assert all(0.75 * want <= got <= 1.1 * want for got, want in zip(image.size, size)), (name, image.size)


def test_labels_tell_models_apart_by_the_shortest_ending_of_their_paths():
    from mergekit_metagpt.plots import LABEL_CHARS, picture_labels
    from mergekit_metagpt.similarity import short_names

    assert short_names(["./m/math", "./m/code"]) == ["math", "code"]
    # two folders named alike: their parents tell them apart (not the full absolute paths)
    assert short_names(["/x/a/model", "/x/b/model", "/y/c"]) == ["a/model", "b/model", "c"]
    assert short_names(["/p/a/b/model", "/p/c/b/model"]) == ["a/b/model", "c/b/model"]
    assert short_names(["m", "./m"]) == ["m", "./m"]  # nothing tells them apart: as written
    # a hub revision may hold "/"; a LoRA reference has two paths; Windows paths
    assert short_names(["org/model@refs/pr/1", "org/model@refs/pr/2"]) == ["model@refs/pr/1", "model@refs/pr/2"]
    assert short_names(["base/m+lora/a", "base/m+lora/b"]) == ["m+a", "m+b"]
    assert short_names(["C:\\x\\a\\model", "C:\\x\\b\\model"]) == ["a/model", "b/model"]
    long = ["/m/some-very-long-fine-tune-name-v2-instruct-dpo-final",
            "/m/some-very-long-fine-tune-name-v2-instruct-sft-final"]
    labels = picture_labels(long)
    assert all(len(label) == LABEL_CHARS and "…" in label for label in labels), labels
    assert labels[0] != labels[1] and labels[0].endswith("dpo-final") and labels[0].startswith("some-very")
    # two names that read the same once shortened are numbered
    same = ["/l/run-2024-01-15-lr1e-5-step-1000-final-merged-math", "/l/run-2024-01-15-lr1e-5-step-2000-final-merged-math",
            "/x/code"]
    labels = picture_labels(same)
    assert len(set(labels)) == 3 and labels[0].startswith("1. ") and labels[2] == "3. code", labels


def test_pictures_draw_one_bar_per_model_and_label_every_kind_of_layer(tmp_path, monkeypatch):
    """Two models whose labels read alike still get a bar each; a deep model's heatmap labels
    one block in k, and always embed, other and head."""
    from mergekit_metagpt import plots
    from mergekit_metagpt.similarity import SetStats

    layers = ["embed"] + [str(i) for i in range(80)] + ["other", "head"]
    models = ["/l/run-2024-01-15-lr1e-5-step-1000-final-merged-math",
              "/l/run-2024-01-15-lr1e-5-step-2000-final-merged-math", "/x/code"]
    stats = SetStats(models=models, squared_norms=[1.0, 2.0, 3.0], lambdas=[1 / 6, 2 / 6, 3 / 6],
                     cosine=[[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]], layers=layers,
                     layer_norms=[[1.0] * len(layers) for _ in models], layer_cosine={}, top_tensors=[[], [], []])
    figures = {}
    save = plots._save

    def keep(fig, out_dir, stem, suffix):
        ax = fig.axes[0]
        figures[stem] = (len({round(p.get_x(), 6) for p in ax.patches}), [t.get_text() for t in ax.get_xticklabels()])
        return save(fig, out_dir, stem, suffix)

    monkeypatch.setattr(plots, "_save", keep)
    monkeypatch.setattr(plots, "picture_labels", lambda names: ["same label"] * len(names))  # at worst
    plots.write_pictures(stats, str(tmp_path))
    bars, _ = figures["metagpt-lambdas"]
    assert bars == 3  # side by side, not on top of each other
    _, ticks = figures["metagpt-layer-norms"]
    assert ticks[:3] == ["embed", "0", "2"] and ticks[-3:] == ["78", "other", "head"], ticks
    # several stacks of blocks (a vision tower beside the language model): numbered per stack
    stacked = (["embed"] + [f"vision_tower {i}" for i in range(32)] + [f"language_model {i}" for i in range(40)]
               + ["other", "head"])
    labelled = [stacked[i] for i in plots.layer_ticks(stacked)]
    assert len(labelled) == 1 + 16 + 20 + 2 and "vision_tower 30" in labelled and "language_model 39" not in labelled
    cells, _ = figures["metagpt-cosines"]
    assert cells == 2  # the pair at 0.5 outlined, above and below the diagonal (two columns)


def test_inspect_of_sparse_norms_says_so_and_draws_no_matrix_of_blanks(llama_family, tmp_path):
    """lambda_from: sparse: no cosine is computed; the report and the pictures' titles say
    the norms are of the sparsified task vectors, and no picture (nor table) of n/a is
    drawn; an earlier run's cosine picture in the folder is removed (the card would link it)."""
    from PIL import Image

    paths, _ = llama_family
    config = recipe(paths, MODELS, method="metagpt_ties", parameters={"lambda_from": "sparse", "density": 0.5})
    out = tmp_path / "inspect"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "metagpt-cosines.png")  # an earlier run's
    assert inspect(write_yaml(config, str(tmp_path / "r.yml")), str(out)) == 0
    assert not (out / "metagpt-cosines.png").exists()
    assert (out / "metagpt-lambdas.png").exists() and (out / "metagpt-layer-norms.png").exists()
    report = (out / "metagpt-report.md").read_text()
    assert "δ_t the sparsified θ_t − θ₀" in report and "metagpt-cosines.png" not in report
    assert "| – |" not in report and "### Cosine per layer" not in report
    assert "Not computed where λ come from sparsified task vectors (lambda_from: sparse)." in report
    # the JSON says which parameters these λ are of, as the merge's record does
    entry = json.loads((out / "metagpt-inspect.json").read_text())["merges"][0]
    assert entry["lambda_from"] == "sparse" and entry["int8_mask"] is False
    assert entry["density"] == {paths[m]: 0.5 for m in MODELS}
    assert entry["granularity"] == "global" and entry["lambda"] == 1.0


def test_a_sparse_merge_logs_no_table_of_blanks(llama_family, merge_options, tmp_path, caplog, capsys):
    """lambda_from: sparse computes no cosine: the merge's log and inspect's summary say so in
    one sentence, with no matrix of dashes."""
    import logging

    paths, _ = llama_family
    config = recipe(paths, MODELS, method="metagpt_ties", parameters={"lambda_from": "sparse", "density": 0.5})
    with caplog.at_level(logging.INFO, logger="mergekit_metagpt"):
        run_recipe(config, str(tmp_path / "out"), merge_options)
    (line,) = [r.getMessage() for r in caplog.records if "cosine similarities" in r.getMessage()]
    assert line == ("MetaGPT task-vector cosine similarities: Cosine similarities not available: not computed "
                    "where λ come from sparsified task vectors (lambda_from: sparse).")
    assert inspect(write_yaml(config, str(tmp_path / "r.yml")), str(tmp_path / "inspect"), "--no-pictures") == 0
    summary = capsys.readouterr().out
    assert "Cosine similarities not available: not computed" in summary and "–" not in summary, summary


def test_inspect_of_per_tensor_lambdas_says_which_lambdas_it_shows(llama_family, tmp_path, monkeypatch):
    from mergekit_metagpt import plots

    contexts = []
    write_pictures = plots.write_pictures
    monkeypatch.setattr(plots, "write_pictures",
                        lambda stats, out, suffix="", context=(), sparse=False:
                        contexts.append(list(context)) or write_pictures(stats, out, suffix, context, sparse))
    paths, _ = llama_family
    config = recipe(paths, MODELS, parameters={"granularity": [{"filter": "mlp", "value": "per_tensor"},
                                                               {"value": "global"}]})
    out = tmp_path / "inspect"
    assert inspect(write_yaml(config, str(tmp_path / "r.yml")), str(out)) == 0
    report = (out / "metagpt-report.md").read_text()
    mlp = sum(1 for name in llama_family[1]["base"] if ".mlp." in name)
    total = len(llama_family[1]["base"])
    assert f"`granularity: per_tensor` ({mlp} of {total} tensors): the merge takes each such tensor's own λ" in report
    assert contexts == [[f"granularity: per_tensor ({mlp} of {total} tensors): merged with each tensor's own λ; "
                         "these are over the whole set"]]
    entry = json.loads((out / "metagpt-inspect.json").read_text())["merges"][0]
    assert entry["granularity"] == ["global", "per_tensor"] and "lambda_from" not in entry


def test_cosine_picture_shows_the_values_of_the_table(tmp_path, monkeypatch):
    """The picture's cells read as the table's (4 places, signed): a small negative cosine is
    not drawn as 0.000 beside a table that says -0.0003."""
    from mergekit_metagpt import plots
    from mergekit_metagpt.similarity import SetStats

    models = ["/m/math", "/m/code", "/m/chat"]
    stats = SetStats(models=models, squared_norms=[1.0, 2.0, 3.0], lambdas=[1 / 6, 2 / 6, 3 / 6],
                     cosine=[[1.0, -0.00031, -0.00001], [-0.00031, 1.0, None], [-0.00001, None, 1.0]],
                     layers=["embed", "0", "head"], layer_norms=[[1.0] * 3 for _ in models], layer_cosine={},
                     top_tensors=[[], [], []])
    cells = {}
    save = plots._save

    def keep(fig, out_dir, stem, suffix):
        cells[stem] = sorted(t.get_text() for t in fig.axes[0].texts)
        return save(fig, out_dir, stem, suffix)

    monkeypatch.setattr(plots, "_save", keep)
    plots.write_pictures(stats, str(tmp_path))
    assert cells["metagpt-cosines"] == sorted(["-0.0003", "-0.0003", "+0.0000", "+0.0000", "n/a", "n/a"])
    table = stats.cosine_table()
    assert "-0.0003" in table and "+0.0000" in table and "-0.0000" not in table


def test_inspect_without_matplotlib_writes_report_and_json_and_says_how(llama_family, tmp_path, capsys, monkeypatch):
    from mergekit_metagpt import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    paths, _ = llama_family
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    out = str(tmp_path / "inspect")
    assert inspect(config, out) == 0
    printed = capsys.readouterr().out
    assert 'pictures need matplotlib: pip install matplotlib' in printed
    assert sorted(os.listdir(out)) == ["metagpt-inspect.json", "metagpt-report.md"]
    assert "Close to orthogonal" in printed  # independent noise: cosines near 0
    report = open(os.path.join(out, "metagpt-report.md"), encoding="utf-8").read()
    assert '(No pictures: pictures need matplotlib: pip install matplotlib.)' in report


def test_inspect_no_pictures_says_so_not_to_install_matplotlib(llama_family, tmp_path, capsys):
    from mergekit_metagpt.cli import main

    paths, _ = llama_family
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    out = str(tmp_path / "inspect")
    assert main(["inspect", config, out, "--no-pictures"]) == 0
    assert sorted(os.listdir(out)) == ["metagpt-inspect.json", "metagpt-report.md"]
    report = open(os.path.join(out, "metagpt-report.md"), encoding="utf-8").read()
    assert "(No pictures: --no-pictures.)" in report and "matplotlib" not in report


def test_merge_warns_on_aligned_task_vectors_and_card_shows_matrix_and_links_pictures(aligned_family, tmp_path):
    paths, sds = aligned_family
    _, cos, *_ = reference(sds)
    config = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    out = str(tmp_path / "out")
    assert inspect(config, out) == 0  # pictures first, into the merge's folder
    result = run_mergekit_yaml(config, out)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "far from orthogonal" in line]
    assert warning and "model0 and model1" in warning[0], result.stderr[-2000:]
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        matrix = json.load(f)["merges"][0]["cosine_similarity"]["matrix"]
    assert close(matrix[0][1], cos[("model0", "model1")]) and close(matrix[1][2], cos[("model1", "model2")])
    card = open(os.path.join(out, "README.md")).read()
    row = next(line for line in card.splitlines() if line.startswith("| model0 |"))
    assert f"{cos[('model0', 'model1')]:+.4f}" in row
    assert "[cosine matrix](metagpt-cosines.png)" in card and "[λ per model](metagpt-lambdas.png)" in card


def test_card_does_not_link_pictures_of_other_models(aligned_family, llama_family, tmp_path):
    paths, _ = aligned_family
    other, _ = llama_family
    out = str(tmp_path / "out")
    assert inspect(write_yaml(recipe(other, MODELS), str(tmp_path / "other.yml")), out) == 0
    result = run_mergekit_yaml(write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml")), out)
    assert result.returncode == 0, result.stderr
    card = open(os.path.join(out, "README.md")).read()
    assert "Cosine similarity of the task vectors" in card and "metagpt-cosines.png" not in card


def test_orthogonal_models_merge_without_warning(llama_family, tmp_path):
    paths, sds = llama_family
    result = run_mergekit_yaml(write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml")), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "orthogonal" not in result.stderr
    # computed, not skipped: the record's cosines are the float64 ones, and say orthogonal
    _, cos, *_ = reference(sds)
    with open(tmp_path / "out" / "metagpt_coefficients.json") as f:
        similarity = json.load(f)["merges"][0]["cosine_similarity"]
    for i, a in enumerate(MODELS):
        for j, b in enumerate(MODELS[i + 1:], i + 1):
            assert abs(similarity["matrix"][i][j] - cos[(a, b)]) < 1e-6, (a, b)
            assert abs(cos[(a, b)]) < 0.05
    assert similarity["verdict"].startswith("Close to orthogonal"), similarity["verdict"]


def test_warm_merge_takes_cosines_from_the_cache_and_an_older_cache_is_a_miss(aligned_family, merge_options, tmp_path):
    from mergekit_metagpt import norm_cache

    paths, sds = aligned_family
    _, cos, *_ = reference(sds)
    config = recipe(paths, MODELS)

    def matrix(out):
        with open(os.path.join(out, "metagpt_coefficients.json")) as f:
            return json.load(f)["merges"][0]["cosine_similarity"]

    run_recipe(config, str(tmp_path / "cold"), merge_options)
    assert close(matrix(str(tmp_path / "cold"))["matrix"][0][1], cos[("model0", "model1")])
    prepass.clear_memo()
    read = prepass.STATS.tensors_read
    run_recipe(config, str(tmp_path / "warm"), merge_options)
    assert prepass.STATS.tensors_read == read, "a warm merge read tensors"
    assert matrix(str(tmp_path / "warm"))["matrix"] == matrix(str(tmp_path / "cold"))["matrix"]

    # a cache written before inner products existed: norms entries only
    cache = norm_cache.cache_dir()
    products = [f for f in os.listdir(cache) if f.endswith(".json") and "products" in json.load(open(os.path.join(cache, f)))]
    assert len(products) == 3  # one per pair of models
    for name in products:
        os.remove(os.path.join(cache, name))
    prepass.clear_memo()
    run_recipe(config, str(tmp_path / "old-cache"), merge_options)
    assert prepass.STATS.tensors_read == read, "the merge re-read tensors for the cosines"
    old = matrix(str(tmp_path / "old-cache"))
    assert old["matrix"][0][1] is None and "cache" in old["note"] and "not available" in old["verdict"]
    # inspect computes what is missing
    assert inspect(write_yaml(config, str(tmp_path / "r.yml")), str(tmp_path / "inspect")) == 0
    assert prepass.STATS.tensors_read > read
    with open(tmp_path / "inspect" / "metagpt-inspect.json") as f:
        assert close(json.load(f)["merges"][0]["cosine"][0][1], cos[("model0", "model1")])


def _cosine_entry(out):
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        return json.load(f)["merges"][0]["cosine_similarity"]


def test_a_cached_model_merged_with_a_new_one_is_read_again_for_their_products(aligned_family, merge_options,
                                                                                tmp_path, caplog):
    """model0 and model2 merged first (their norms and product cached), then model1 joins:
    the pre-pass reads model1 for its norms, and model0's and model2's tensors too for
    model1's products with them, so the merge warns of model0·model1 (≈ 0.5) at once; it
    does not compute model0·model2 again."""
    import logging

    paths, sds = aligned_family
    _, cos, *_ = reference(sds)
    run_recipe(recipe(paths, ["model0", "model2"]), str(tmp_path / "first"), merge_options)
    prepass.clear_memo()
    caplog.set_level(logging.INFO, logger="mergekit_metagpt")
    read, hits = prepass.STATS.tensors_read, prepass.STATS.cache_hits
    run_recipe(recipe(paths, MODELS), str(tmp_path / "joined"), merge_options)
    tensors = len(sds["base"])
    assert prepass.STATS.tensors_read - read == 4 * tensors  # the base and the three models
    assert prepass.STATS.cache_hits == hits  # their norms are cached, but they were read
    for model in ("model0", "model2"):
        said = [r.getMessage() for r in caplog.records if f"norms of {paths[model]} from the norm cache" in r.getMessage()]
        assert len(said) == 1 and "read again for its inner products" in said[0], said
    joined = _cosine_entry(str(tmp_path / "joined"))
    for (a, b), value in cos.items():
        assert close(joined["matrix"][MODELS.index(a)][MODELS.index(b)], value), (a, b)
    assert "far from orthogonal" in joined["verdict"] and "Not computed" not in joined["verdict"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model0 and model1 task vectors have cosine" in w for w in warnings)
    assert not any("not computed" in r.getMessage() for r in caplog.records)


def test_pairs_a_warm_merge_could_not_compute_are_named(aligned_family, merge_options, tmp_path,
                                                                      caplog):
    """model0 + model2, then model1 + model2 merged first: every norm is cached, and
    model0·model1 is not, so the merge of all three reads nothing and cannot compute it.
    The verdict must not call the set orthogonal from the other pairs alone (model0·model1
    ≈ 0.5), and the log says which pair is unknown; after `inspect`, a merge warns of it."""
    import logging

    paths, sds = aligned_family
    _, cos, *_ = reference(sds)
    entry = _cosine_entry

    run_recipe(recipe(paths, ["model0", "model2"]), str(tmp_path / "first"), merge_options)
    run_recipe(recipe(paths, ["model1", "model2"]), str(tmp_path / "second"), merge_options)
    prepass.clear_memo()
    caplog.set_level(logging.INFO, logger="mergekit_metagpt")
    config = recipe(paths, MODELS)
    read = prepass.STATS.tensors_read
    run_recipe(config, str(tmp_path / "joined"), merge_options)
    assert prepass.STATS.tensors_read == read  # no norm to read: no read for a product alone
    joined = entry(str(tmp_path / "joined"))
    assert joined["matrix"][0][1] is None
    assert close(joined["matrix"][0][2], cos[("model0", "model2")]) and abs(joined["matrix"][0][2]) < 0.1
    assert close(joined["matrix"][1][2], cos[("model1", "model2")]) and abs(joined["matrix"][1][2]) < 0.1
    assert joined["verdict"].startswith("Not computed for 1 of 3 pairs (model0 and model1)")
    assert "Of the pairs computed: close to orthogonal" in joined["verdict"]
    said = [r for r in caplog.records if "cosine similarities not computed" in r.getMessage()]
    assert len(said) == 1 and "1 of 3 pairs (model0 and model1)" in said[0].getMessage()
    assert "mergekit-metagpt inspect" in said[0].getMessage()
    assert said[0].levelno == logging.INFO  # every new combination of cached models: not a warning

    assert inspect(write_yaml(config, str(tmp_path / "r.yml")), str(tmp_path / "inspect")) == 0
    prepass.clear_memo()
    caplog.clear()
    run_recipe(config, str(tmp_path / "after-inspect"), merge_options)
    after = entry(str(tmp_path / "after-inspect"))
    assert close(after["matrix"][0][1], cos[("model0", "model1")])
    assert "far from orthogonal" in after["verdict"] and "Not computed" not in after["verdict"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model0 and model1 task vectors have cosine" in w for w in warnings)
    assert not any("not computed" in r.getMessage() for r in caplog.records)


def test_layer_columns():
    from mergekit_metagpt.similarity import layer_of

    assert layer_of("model.embed_tokens.weight") == "embed"
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "12"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "3"
    assert layer_of("lm_head.weight") == "head"
    assert layer_of("transformer.wpe.weight") == "embed"  # GPT-2 positions
    assert layer_of("shared.weight") == "embed"  # T5
    assert layer_of("model.norm.weight") == "other"


def test_layer_columns_keep_two_stacks_of_blocks_apart():
    """A vision tower's block 0 and the language model's block 0 are two columns (they
    were one, their norms added); one stack keeps plain numbers."""
    from mergekit_metagpt.similarity import layer_columns

    names = ["vision_tower.transformer.layers.0.w", "vision_tower.transformer.layers.1.w",
             "language_model.model.embed_tokens.weight", "language_model.model.layers.0.w",
             "language_model.model.norm.weight", "language_model.lm_head.weight"]
    columns, order = layer_columns(names)
    assert columns == ["vision_tower 0", "vision_tower 1", "embed", "language_model 0", "other", "head"]
    assert order == ["embed", "vision_tower 0", "vision_tower 1", "language_model 0", "other", "head"]
    assert layer_columns(["model.layers.1.w", "model.layers.0.w"]) == (["1", "0"], ["0", "1"])


def test_model_sets_of_other_modules_say_which_blocks_they_hold():
    """A `modules:` recipe with a set per module (T5's encoder and decoder; a projector with
    no blocks): each set's heading names its stacks, which its one-stack columns ("0", "1")
    do not. Sets of one stack (a frankenmerge's slices) need no such words."""
    from mergekit_metagpt.plots import tick_rotation
    from mergekit_metagpt.similarity import where_sets_are

    decoder = ["decoder.block.0.layer.0.w", "decoder.block.1.layer.0.w", "decoder.final_layer_norm.weight"]
    encoder = ["encoder.block.0.layer.0.w", "shared.weight"]
    projector = ["multi_modal_projector.linear_1.weight"]
    assert where_sets_are([decoder, encoder, projector]) == ["blocks of decoder", "blocks of encoder", "no blocks"]
    slices = [["model.layers.0.w", "model.embed_tokens.weight"], ["model.layers.1.w", "lm_head.weight"]]
    assert where_sets_are(slices) == ["", ""]
    assert where_sets_are([decoder]) == [""]
    # the heatmap's labels stand up where side by side they would run into each other
    stacked = ["embed", "language_model 0", "language_model 1", "vision_tower 0", "vision_tower 1",
               "vision_tower 2", "other"]
    assert tick_rotation(stacked, 8.0) == 90
    assert tick_rotation(["embed", "0", "1", "other", "head"], 8.0) == 0
    assert tick_rotation([str(i) for i in range(25)], 16.0) == 90


def test_cosines_off_in_merges_computes_no_products(aligned_family, merge_options, tmp_path, monkeypatch):
    from mergekit_metagpt import norm_cache, norms

    paths, sds = aligned_family
    monkeypatch.setenv("MERGEKIT_METAGPT_COSINES", "0")
    pairs_asked = []
    real = norms.task_vector_sums
    monkeypatch.setattr(prepass, "task_vector_sums", lambda *a, **k: pairs_asked.append(k.get("pairs")) or real(*a, **k))
    out = str(tmp_path / "out")
    merged = run_recipe(recipe(paths, MODELS), out, merge_options)
    assert pairs_asked and not any(pairs_asked)
    with open(os.path.join(out, "metagpt_coefficients.json")) as f:
        cosine = json.load(f)["merges"][0]["cosine_similarity"]
    assert cosine["matrix"][0][1] is None and "MERGEKIT_METAGPT_COSINES=0" in cosine["note"]
    assert not [n for n in os.listdir(norm_cache.cache_dir()) if n.endswith(".json") and "products" in json.load(open(os.path.join(norm_cache.cache_dir(), n)))]
    from checkpoints import closed_form

    _, reference_merge = closed_form(sds["base"], [sds[m] for m in MODELS])
    for name, want in reference_merge.items():  # the merge itself is unchanged
        assert (merged[name].double() - want).abs().max().item() < 1e-5


def test_inspect_of_two_model_sets_names_the_set_on_each_picture(llama_family, tmp_path, monkeypatch):
    from merging import slices_recipe
    from mergekit_metagpt import plots

    drawn = []
    write_pictures = plots.write_pictures
    monkeypatch.setattr(plots, "write_pictures",
                        lambda stats, out, suffix="", context=(), sparse=False:
                        drawn.append((suffix, list(context))) or write_pictures(stats, out, suffix, context, sparse))
    paths, _ = llama_family
    out = tmp_path / "inspect"
    assert inspect(write_yaml(slices_recipe(paths), str(tmp_path / "r.yml")), str(out)) == 0
    assert [suffix for suffix, _ in drawn] == ["-1", "-2"]
    for number, (_, context) in enumerate(drawn, 1):
        assert len(context) == 1 and context[0].startswith(f"model set {number} of 2 ("), context
        assert (out / f"metagpt-cosines-{number}.png").exists()



def test_pictures_leave_the_callers_matplotlib_as_it_was(tmp_path):
    """A notebook that runs inspect in-process keeps its backend and its settings (they were
    switched to Agg and to the pictures' font sizes for the rest of the session)."""
    import matplotlib

    from mergekit_metagpt import plots
    from mergekit_metagpt.similarity import SetStats

    stats = SetStats(models=["/a", "/b"], squared_norms=[1.0, 2.0], lambdas=[1 / 3, 2 / 3],
                     cosine=[[1.0, 0.1], [0.1, 1.0]], layers=["embed", "0", "head"],
                     layer_norms=[[1.0] * 3, [2.0] * 3], layer_cosine={}, top_tensors=[[], []])
    backend, size = matplotlib.get_backend(), matplotlib.rcParams["font.size"]
    try:
        matplotlib.use("svg")
        matplotlib.rcParams["font.size"] = 7.0
        written = plots.write_pictures(stats, str(tmp_path))
        assert len(written) == 3 and all(os.path.getsize(p) > 0 for p in written)
        assert matplotlib.get_backend() == "svg" and matplotlib.rcParams["font.size"] == 7.0
    finally:
        matplotlib.use(backend)
        matplotlib.rcParams["font.size"] = size


def test_norms_are_not_cached_without_the_inner_products_of_their_merge(aligned_family, merge_options,
                                                                         tmp_path, caplog, monkeypatch):
    """The disk fills between the two kinds of entry: the products cannot be written. Had
    the norms been written (then, or later from the memo with another entry's write), the
    next merge would find every norm cached, read nothing and leave model0·model1 (≈ 0.5)
    uncomputed and unwarned; it must read the models again, compute the products and warn."""
    import errno
    import logging

    from mergekit_metagpt import norm_cache

    paths, sds = aligned_family
    _, cos, *_ = reference(sds)
    config = recipe(paths, MODELS)
    write_json = norm_cache.write_json

    def full_for_products(path, payload, **kwargs):
        if "products" in payload:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return write_json(path, payload, **kwargs)

    monkeypatch.setattr(norm_cache, "write_json", full_for_products)
    caplog.set_level(logging.INFO, logger="mergekit_metagpt")
    run_recipe(config, str(tmp_path / "disk-full"), merge_options)
    assert any("could not write the norm cache" in r.getMessage() for r in caplog.records)
    assert close(_cosine_entry(str(tmp_path / "disk-full"))["matrix"][0][1], cos[("model0", "model1")])
    monkeypatch.setattr(norm_cache, "write_json", write_json)
    # the same process merges them again, read as bfloat16 (other keys): their entries are
    # written now, with what the memo holds, which must not be the float32 norms above
    run_recipe(recipe(paths, MODELS, dtype="bfloat16"), str(tmp_path / "bfloat16"), merge_options)

    prepass.clear_memo()
    caplog.clear()
    read = prepass.STATS.tensors_read
    run_recipe(config, str(tmp_path / "after"), merge_options)
    assert prepass.STATS.tensors_read - read == 4 * len(sds["base"])  # the base and the three models
    after = _cosine_entry(str(tmp_path / "after"))
    for (a, b), value in cos.items():
        assert close(after["matrix"][MODELS.index(a)][MODELS.index(b)], value), (a, b)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model0 and model1 task vectors have cosine" in w for w in warnings)
    assert not any("not computed" in r.getMessage() for r in caplog.records)

    # and now both are cached: a third merge reads nothing and has every cosine
    prepass.clear_memo()
    read = prepass.STATS.tensors_read
    run_recipe(config, str(tmp_path / "warm"), merge_options)
    assert prepass.STATS.tensors_read == read
    assert _cosine_entry(str(tmp_path / "warm"))["matrix"] == after["matrix"]
