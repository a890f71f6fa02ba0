"""The quality benchmark's own arithmetic (benchmarks/quality.py): the variants' weights reach
the stock merge as computed, the code and docs domains share no text, and the verdicts call a
difference within the seed noise a tie."""

import hashlib
import json
import os
import sys

import pytest
import torch

from checkpoints import perturbed, random_state_dict, save_checkpoint
from merging import run_recipe

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import quality  # noqa: E402


def _family(tmp_path, layers=12):
    """Base + three fine-tune-like models, one safetensors file each (as the benchmark's),
    with enough blocks that "layers.1." must not catch "layers.10."."""
    base = random_state_dict(0, num_hidden_layers=layers)
    sds = {"base": base}
    for i, (domain, scale) in enumerate(zip(quality.DOMAINS, (0.1, 0.03, 0.01))):
        sds[domain] = perturbed(base, scale, seed=10 + i)
        # a block-dependent extra on one model, so per-block λ differ from the global ones
        for name, tensor in sds[domain].items():
            if domain == "docs" and ".layers.1." in name:
                sds[domain][name] = tensor + 0.2 * (tensor - base[name]).sign()
    paths = {k: save_checkpoint(str(tmp_path / k), sd, shard_size=None, num_hidden_layers=layers)
             for k, sd in sds.items()}
    return paths, sds


def _block_lambdas(sds, name):
    """Independent per-block MetaGPT λ: squared norms over the tensor's transformer block
    (or over the tensor alone outside the blocks), in float64."""
    parts = name.split(".")
    block = ".".join(parts[:3]) + "." if "layers" in parts else None
    members = [n for n in sds["base"] if (n.startswith(block) if block else n == name)]
    norms = [sum(float(((sds[d][n].double() - sds["base"][n].double()) ** 2).sum()) for n in members)
             for d in quality.DOMAINS]
    return [x / sum(norms) for x in norms]


def test_per_block_variant_merges_with_each_blocks_own_lambdas(tmp_path):
    from mergekit.options import MergeOptions

    paths, sds = _family(tmp_path)
    method = next(m for m in quality.variant_methods(paths) if "per transformer block" in m.label)
    merged = run_recipe(method.recipe(paths), str(tmp_path / "out"), MergeOptions())
    checked = set()
    for name, base in sds["base"].items():
        lams = _block_lambdas(sds, name)
        expected = base.double() + sum(
            lam * (sds[d][name].double() - base.double()) for lam, d in zip(lams, quality.DOMAINS)
        )
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
        checked.add(tuple(round(x, 6) for x in lams))
    # the blocks' λ really differ (the docs model moved further in block 1 alone)
    assert len(checked) > 3


def test_gram_correction_keeps_each_task_vector_along_itself(tmp_path):
    paths, sds = _family(tmp_path, layers=2)
    method = next(m for m in quality.variant_methods(paths) if "Gram correction" in m.label)
    weights = dict(method.weights)
    flat = {d: torch.cat([(sds[d][n].double() - sds["base"][n].double()).reshape(-1)
                          for n in sds["base"]]) for d in quality.DOMAINS}
    merged = sum(weights[d] * flat[d] for d in quality.DOMAINS)
    for d in quality.DOMAINS:
        assert abs(float(merged @ flat[d]) / float(flat[d] @ flat[d]) - 1.0) < 1e-9


def test_code_and_docs_domains_share_no_docstring(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text(
        '"""Module docstring that is long enough to be kept as documentation."""\n'
        "import os\n\n"
        "def f(x):\n"
        '    """Function docstring, also long enough to be kept as documentation,\n'
        '    over two lines."""\n'
        "    return x + 1\n"
    )
    code, docs = quality._split_source(str(module))
    assert "docstring" not in code
    assert "return x + 1" in code and "import os" in code
    assert [d.split(",")[0] for d in docs] == [
        "Module docstring that is long enough to be kept as documentation.",
        "Function docstring",
    ]


def _rows(**per_seed):
    rows = {}
    for label, values in per_seed.items():
        rows[label] = {"per_seed": values, "mean": sum(values) / len(values),
                       "sd": float(torch.tensor(values).std())}
    return rows


def test_verdicts_call_a_difference_within_the_seed_noise_a_tie():
    ta = {label: [0.1, 0.1, 0.1] for label in quality.TA_GRID}
    ta[quality.TA_GRID[0]] = [0.30, 0.40, 0.35]
    labels = {"metagpt": "paper", "variant: x": "variant", "variant: y": "variant"}
    rows = _rows(**{quality.AVERAGE: [0.30, 0.40, 0.35], "metagpt": [0.32, 0.41, 0.37],
                    "variant: x": [0.60, 0.70, 0.65], "variant: y": [0.42, 0.38, 0.50]}, **ta)
    lines = quality.verdicts(rows, labels)
    metagpt = next(x for x in lines if x.startswith("metagpt"))
    variant = next(x for x in lines if x.startswith("variant"))
    assert metagpt.count("ties") == 2  # above on every seed, by 0.017 on average: within the noise (0.05)
    assert variant.count("wins") == 2  # +0.30 on every seed
    # +0.083 on average, beyond the noise (0.061), but below on one seed
    assert next(x for x in lines if x.startswith("variant: y")).count("ties") == 2


def test_overall_kept_weighs_each_domain_by_its_fine_tune_gain():
    base = {"code": 3.0, "licenses": 3.0, "docs": 3.0}
    own = {"code": 2.0, "licenses": 2.9, "docs": 2.5}  # gains 1.0, 0.1, 0.5
    merged = {"code": 2.0, "licenses": 3.1, "docs": 3.0}  # keeps 1.0, -0.1, 0.0 bits/byte
    assert quality.kept_overall(merged, base, own) == pytest.approx((1.0 - 0.1 + 0.0) / 1.6)
    # the mean over domains of each domain's own share is another number: (1 - 1 + 0) / 3
    assert sum(quality.kept(merged, base, own).values()) / 3 == pytest.approx(0.0)
    results = {"0": {"base": base, "finetunes": {d: own for d in quality.DOMAINS},
                     "merges": {"m": merged}}}
    row = quality.summarise(results, [0])["m"]
    assert row["overall_per_seed"] == pytest.approx([0.5625]) and row["per_seed"] == pytest.approx([0.0])


def test_verdicts_read_the_score_they_are_given():
    ta = {label: {"per_seed": [0.1] * 3, "overall_per_seed": [0.1] * 3} for label in quality.TA_GRID}
    rows = {quality.AVERAGE: {"per_seed": [0.5, 0.6, 0.55], "overall_per_seed": [0.5, 0.6, 0.55]},
            "metagpt": {"per_seed": [0.1, 0.2, 0.15], "overall_per_seed": [0.9, 1.0, 0.95]}, **ta}
    (mean_kept,) = [x for x in quality.verdicts(rows, {"metagpt": "paper"}) if x.startswith("metagpt")]
    (overall,) = [x for x in quality.verdicts(rows, {"metagpt": "paper"}, "overall_per_seed")
                  if x.startswith("metagpt")]
    assert mean_kept.startswith("metagpt: loses vs linear (-0.400")
    assert overall.startswith("metagpt: wins vs linear (+0.400")


def test_base_domains_leave_licenses_out_of_the_base_by_default_under_its_own_key(tmp_path, monkeypatch):
    from dataclasses import asdict, replace

    seen = {}

    def fake_train(model, data, *args, **kwargs):
        seen["data"] = data
        return 0.0

    monkeypatch.setattr(quality, "_train", fake_train)
    monkeypatch.setattr(quality, "_save", lambda *a, **k: None)
    # licenses, left out of the base, is the smallest domain
    sizes = {"code": 5000, "licenses": 3000, "docs": 6000}
    domains = {d: quality.Domain(d, torch.full((sizes[d],), 10 * (i + 1)), torch.zeros(300, dtype=torch.long))
               for i, d in enumerate(quality.DOMAINS)}
    settings = quality.Settings(hidden=16, layers=1, intermediate=32)
    assert settings.base_domains == ("code", "docs")  # the default: licenses are new to the base
    quality.ensure_base(str(tmp_path), settings, domains, "digest")
    values = set(seen["data"].unique().tolist())
    assert values == {10, 30}  # code and docs bytes, no licenses
    # equal shares of the two, each the size of the smallest of all domains (not of the two)
    assert len(seen["data"]) == 2 * 3000
    quality.ensure_base(str(tmp_path), replace(settings, base_domains=quality.DOMAINS), domains, "digest")
    assert sorted(seen["data"].unique().tolist()) == [10, 20, 30] and len(seen["data"]) == 3 * 3000
    # another base: other keys, so models cached for one are not reused for the other
    every = replace(quality.Settings(), base_domains=quality.DOMAINS)
    default = quality.Settings()
    assert every.key("base", "d") != default.key("base", "d")
    assert every.key("finetunes", "d") != default.key("finetunes", "d")
    # keys as the code before 2026-11-30 made them: a code,docs base then saw as much of each
    # as the smaller of the two had (not the smallest of all), so its models must not be
    # reused; a base of all three saw the same data then as now, and keeps its key
    def key_before(base_domains):
        values = {k: v for k, v in asdict(default).items()
                  if k in ("hidden", "layers", "intermediate", "batch", "base_steps", "base_lr", "max_bytes")}
        values.update(format=quality.FORMAT, data="d", python=sys.version_info[:2], seq=quality.SEQ,
                      block=quality.BLOCK)
        if base_domains != quality.DOMAINS:
            values["base_domains"] = list(base_domains)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    assert default.key("base", "d") != key_before(("code", "docs"))
    assert every.key("base", "d") == key_before(quality.DOMAINS)


def test_only_names_known_rows_and_keeps_a_full_runs_results(tmp_path, capsys):
    # a misspelt row is refused before any training (it merged nothing and exited 0)
    with pytest.raises(SystemExit) as refused:
        quality.main(["--quick", "--only", "metagtp;metagpt", "--work", str(tmp_path)])
    assert "--only: no row 'metagtp'; rows: metagpt; " in str(refused.value)
    assert quality.GRAM in str(refused.value) and not os.listdir(tmp_path)
    # a run of some rows writes its own file (it used to overwrite a full run's results)
    full = quality.results_file("w", "k")
    some = quality.results_file("w", "k", {"metagpt"})
    assert full == os.path.join("w", "quality-results-k.json")
    assert some != full and some != quality.results_file("w", "k", {"metagpt", quality.GRAM})
    assert some == quality.results_file("w", "k", {"metagpt"})
