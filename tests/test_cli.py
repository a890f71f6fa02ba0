"""mergekit-metagpt coefficients / bake check a recipe as mergekit-yaml does.

Every refusal is one line on stderr, ``mergekit-metagpt: error: ...``, exit status 1,
and ``bake`` then writes nothing. The command-line cases run the installed console
script in fresh processes (started together, to keep the suite quick).
"""

import json
import os
import re
import subprocess
import textwrap
import sys

import pytest
import yaml

from merging import recipe, run_recipe, safetensors_in, slices_recipe, write_yaml
from mergekit.io.tasks import LoaderCache
from mergekit_metagpt import prepass
from mergekit_metagpt.cli import main

MODELS = ["model0", "model1", "model2"]
SCRIPT = os.path.join(os.path.dirname(sys.executable), "mergekit-metagpt")


def _with_model_params(paths, params, models=("model0", "model1")):
    config = recipe(paths, list(models))
    config["models"][0]["parameters"] = params
    return config


def _bad_recipes(paths):
    """name: (recipe, what the one error line must contain, or that per command)."""
    return {
        "negative_lambda": (recipe(paths, MODELS, parameters={"lambda": -1}),
                            ["parameter lambda must be a number in [0, 3.4e38]", "-1"]),
        "lambda_not_a_number": (recipe(paths, MODELS, parameters={"lambda": "big"}),
                                ["parameter lambda must be a number in [0, 3.4e38]", "big"]),
        "misspelt_parameter": (recipe(paths, MODELS, parameters={"lamda": 0.5}),
                               ["Unknown parameter", "lamda", "it takes: alpha, granularity, lambda"]),
        "misspelt_key": ({**recipe(paths, MODELS), "paramters": {"lambda": 0.5}},
                         ["the recipe key 'paramters' of ", "(at the top level)", "did you mean 'parameters'?"]),
        "alpha_out_of_range": (recipe(paths, MODELS, parameters={"alpha": 1.5}),
                               ["parameter alpha must be a number in [0, 1]", "1.5"]),
        "per_model_lambda": (_with_model_params(paths, {"lambda": 0.5}),
                             ["lambda", "given for a single model", "top-level"]),
        "per_model_weight": (_with_model_params(paths, {"weight": 0.5}),
                             ["weight", "MetaGPT computes each model's weight", "mergekit-metagpt bake"]),
        "missing_model_folder": (
            {**recipe(paths, ["model0"]), "models": [{"model": paths["model0"]},
                                                     {"model": paths["base"] + "-no-such-model"}]},
            [f"model {paths['base']}-no-such-model: no such folder"]),
        # mergekit's own message: IndexError at planning (and so, to the CLI, a bug)
        "empty_slice": ({"merge_method": "metagpt", "base_model": paths["base"], "slices": [{"sources": []}]},
                        {"coefficients": ["slice 1 has no sources"], "bake": ["bake writes one weight per model"]}),
    }


BAD = ["negative_lambda", "lambda_not_a_number", "misspelt_parameter", "misspelt_key", "per_model_lambda",
       "per_model_weight", "missing_model_folder", "empty_slice"]



@pytest.fixture(scope="module")
def cli_runs(llama_family, tmp_path_factory):
    """Fresh console-script processes, two at a time: {(case, command): (rc, stdout, stderr, wrote)}."""
    paths, _ = llama_family
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE_DIR=str(root / "cache"), MERGEKIT_METAGPT_PROGRESS="0")
    cases = _bad_recipes(paths)
    jobs = {}
    # a parameter mergekit itself resolves while planning (transformers has spoken by then)
    path = write_yaml(cases["negative_lambda"][0], str(root / "negative_lambda.yml"))
    for command in ("coefficients", "bake"):
        out = str(root / f"negative_lambda-{command}-baked.yml")
        jobs[("negative_lambda", command)] = (
            [SCRIPT, command, path] + ([out] if command == "bake" else []), out, env)
    slices = write_yaml(slices_recipe(paths), str(root / "slices.yml"))
    out = str(root / "slices-baked.yml")
    jobs[("bake_slices", "bake")] = ([SCRIPT, "bake", slices, out], out, env)
    # a hub id with HF_HUB_OFFLINE=1 (read when huggingface_hub is imported): time main()
    # itself, after the imports
    hub = write_yaml({**recipe(paths, ["model0"]),
                      "models": [{"model": paths["model0"]}, {"model": "metagpt-test-org/no-such-model"}]},
                     str(root / "hub.yml"))
    timed = ("import sys, time\nimport mergekit.merge, mergekit.plan, mergekit.options, mergekit.architecture\n"
             "from mergekit_metagpt.cli import main\nt = time.perf_counter()\n"
             "rc = main(sys.argv[1:])\nprint(f'ELAPSED {time.perf_counter() - t:.3f}')\nsys.exit(rc)\n")
    jobs[("hub_offline", "coefficients")] = (
        [sys.executable, "-c", timed, "coefficients", hub], None, dict(env, HF_HUB_OFFLINE="1"))
    # a warning (one model: λ 1), which comes after mergekit's options set up logging
    one = write_yaml(recipe(paths, ["model0"]), str(root / "one_model.yml"))
    jobs[("one_model", "coefficients")] = ([SCRIPT, "coefficients", one], None, env)
    # mergekit-yaml itself, with a per-model lambda (the start-up hook's run_merge check)
    per_model = write_yaml(cases["per_model_lambda"][0], str(root / "per_model_lambda.yml"))
    merged = str(root / "per-model-lambda-merged")
    jobs[("per_model_lambda", "mergekit-yaml")] = (
        [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), per_model, merged,
         "--no-copy-tokenizer", "--quiet"], merged, env)
    results = {}
    keys = list(jobs)
    for start in range(0, len(keys), 2):
        batch = {
            key: subprocess.Popen(jobs[key][0], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=jobs[key][2])
            for key in keys[start:start + 2]
        }
        for key, process in batch.items():
            stdout, stderr = process.communicate(timeout=600)
            out = jobs[key][1]
            results[key] = (process.returncode, stdout, stderr, bool(out) and os.path.exists(out))
    return results


def _one_error_line(rc, stderr):
    assert rc == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mergekit-metagpt: error: "), stderr
    assert "MERGEKIT_METAGPT_DEBUG" not in lines[0], stderr  # an input error is not a bug
    return lines[0]


@pytest.mark.parametrize("debug", [None, "1"])
def test_an_error_no_input_explains_says_how_to_see_its_traceback(debug, llama_family, tmp_path, monkeypatch,
                                                                   capfd):
    """A bug (here a TypeError inside a command) is still one line, saying it is not an
    input error; MERGEKIT_METAGPT_DEBUG=1 prints its traceback first."""
    from mergekit_metagpt import cli

    def buggy(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(cli, "_coefficients", buggy)
    if debug:
        monkeypatch.setenv("MERGEKIT_METAGPT_DEBUG", debug)
    else:
        monkeypatch.delenv("MERGEKIT_METAGPT_DEBUG", raising=False)
    path = write_yaml(recipe(llama_family[0], ["model0"]), str(tmp_path / "r.yml"))
    capfd.readouterr()
    assert main(["coefficients", path]) == 1
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last == ("mergekit-metagpt: error: TypeError: unsupported operand type(s) for +: 'int' and 'NoneType' "
                    "(not an input error: MERGEKIT_METAGPT_DEBUG=1 prints the traceback)"), err
    if debug:
        assert "Traceback (most recent call last)" in err and "in buggy" in err, err
    else:
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["coefficients", "bake"])
@pytest.mark.parametrize("case", BAD)
def test_bad_recipe_is_refused_in_one_line(case, command, llama_family, tmp_path, capfd):
    config, expected = _bad_recipes(llama_family[0])[case]
    path = write_yaml(config, str(tmp_path / "r.yml"))
    out = str(tmp_path / "baked.yml")
    capfd.readouterr()
    runs = prepass.STATS.runs
    rc = main([command, path] + ([out] if command == "bake" else []))
    captured = capfd.readouterr()
    line = _one_error_line(rc, captured.err)
    for text in expected[command] if isinstance(expected, dict) else expected:
        assert text in line, (text, line)
    assert not os.path.exists(out)  # bake wrote nothing
    assert prepass.STATS.runs == runs  # refused before any tensor was read


@pytest.mark.parametrize("params, expected", [
    ({"granularity": "per_tensor"}, "granularity per_tensor gives a λ per tensor"),
    ({"lambda_from": "sparse", "density": 0.5}, "lambda_from: sparse depends on the sparsification"),
])
def test_bake_refuses_what_has_no_weight_per_model_before_reading(params, expected, llama_family, tmp_path,
                                                                   capfd):
    path = write_yaml(recipe(llama_family[0], MODELS, method="metagpt_ties", parameters=params),
                      str(tmp_path / "r.yml"))
    out = tmp_path / "baked.yml"
    runs = prepass.STATS.runs
    capfd.readouterr()
    assert expected in _one_error_line(main(["bake", path, str(out)]), capfd.readouterr().err)
    assert not out.exists()
    assert prepass.STATS.runs == runs  # no pre-pass
    assert not (tmp_path / "norm-cache").exists()  # nothing cached either


@pytest.mark.parametrize("command", ["coefficients", "bake"])
def test_console_script_refuses_a_bad_lambda_in_one_line(command, cli_runs):
    rc, _stdout, stderr, wrote = cli_runs[("negative_lambda", command)]
    line = _one_error_line(rc, stderr)
    assert "parameter lambda must be a number in [0, 3.4e38] (got -1)" in line, line
    assert not wrote


def test_the_commands_warnings_read_as_its_error_lines_do(cli_runs):
    rc, stdout, stderr, _ = cli_runs[("one_model", "coefficients")]
    assert rc == 0 and "1.000000" in stdout, stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "mergekit-metagpt: warning: MetaGPT: only one model besides the base"), stderr


def test_a_program_that_calls_main_keeps_its_own_logging(llama_family, tmp_path):
    """main() called in-process by a program that set up its logging: its handlers and
    format stay as they were (main reformatted every console handler, for good)."""
    paths, _ = llama_family
    path = write_yaml(recipe(paths, ["model0"]), str(tmp_path / "one.yml"))
    code = textwrap.dedent(f"""
        import logging
        logging.basicConfig(format="APP %(name)s %(message)s", level=logging.INFO)
        from mergekit_metagpt.cli import main
        assert main(["coefficients", {path!r}]) == 0
        logging.getLogger("myapp").info("after")
        import sys
        print(sys.stdout.errors)  # a stdout that shows λ is left as it was
        print(len(logging.getLogger().handlers))
    """)
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE_DIR=str(tmp_path / "cache"), MERGEKIT_METAGPT_PROGRESS="0",
               PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-2:] == ["strict", "1"]
    assert "APP myapp after" in result.stderr.splitlines(), result.stderr[-3000:]
    assert "APP mergekit_metagpt MetaGPT: only one model besides the base" in result.stderr, result.stderr[-3000:]


def test_a_console_that_cannot_show_lambda_gets_it_escaped_not_an_error(llama_family, tmp_path):
    """inspect prints the verdict, which has a λ in it: to a stdout whose encoding lacks λ
    (PYTHONIOENCODING=ascii) it failed with a UnicodeEncodeError after its work was done."""
    paths, _ = llama_family
    path = write_yaml(recipe(paths, ["model0", "model1"]), str(tmp_path / "two.yml"))
    out = tmp_path / "inspect"
    code = f"import sys\nfrom mergekit_metagpt.cli import main\nsys.exit(main(['inspect', {path!r}, {str(out)!r}, '--no-pictures']))\n"
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE_DIR=str(tmp_path / "cache"), MERGEKIT_METAGPT_PROGRESS="0",
               PYTHONIOENCODING="ascii")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, env=env,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert b"MetaGPT's \\u03bb assume" in result.stdout, result.stdout[-3000:]
    assert "MetaGPT's λ assume" in (out / "metagpt-report.md").read_text(encoding="utf-8")


def _run_with_a_file_size_limit(command_args, limit: int, tmp_path):
    """main(command_args) in a child process whose files may not grow beyond `limit` bytes
    (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk; no mount needed)."""
    code = textwrap.dedent(f"""
        import resource, sys
        from mergekit_metagpt.cli import main
        # imported before the limit: what writes files as it is imported or first used
        # (matplotlib's font cache; torch <= 2.9 writes a module to /tmp as mergekit imports it)
        import mergekit.architecture, mergekit.common, mergekit.config, mergekit.merge, mergekit.options, mergekit.plan
        try:
            import matplotlib.font_manager
        except ImportError:
            pass
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        sys.exit(main({command_args!r}))
    """)
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE="0", MERGEKIT_METAGPT_PROGRESS="0",
               MPLCONFIGDIR=str(tmp_path / "mpl"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(tmp_path))


def test_bake_on_a_full_disk_leaves_the_earlier_file_not_a_shorter_recipe(llama_family, tmp_path):
    """A recipe cut short is YAML that merges other weights (a model left out, a weight cut
    to fewer digits): bake writes all of it or nothing, and names the file."""
    paths, _ = llama_family
    path = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    out = tmp_path / "baked.yml"
    out.write_text("# an earlier bake\n")
    result = _run_with_a_file_size_limit(["bake", path, str(out)], 300, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    line = _one_error_line(result.returncode, result.stderr)
    assert line.startswith(f"mergekit-metagpt: error: cannot write {out}: File too large"), line
    assert out.read_text() == "# an earlier bake\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []
    assert main(["bake", path, str(out)]) == 0 and os.path.getsize(out) > 300  # the limit did cut it


def test_bake_writes_through_a_link_into_a_pipe_and_keeps_a_files_permissions(llama_family, tmp_path, capfd):
    """Written all at once by a rename, bake's output must still go where a plain write went:
    the file a symlink names (the link stays), a pipe (`/dev/fd/1`, `>(...)`), an existing
    file's permissions. A missing recipe beside an existing output is named as missing."""
    paths, _ = llama_family
    path = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE_DIR=str(tmp_path / "cache"), MERGEKIT_METAGPT_PROGRESS="0")
    result = subprocess.run([SCRIPT, "bake", path, "/dev/fd/1"], capture_output=True, text=True, timeout=300,
                            env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" not in result.stdout  # the recipe alone, for a pipe into mergekit-yaml /dev/stdin
    baked = yaml.safe_load(result.stdout)
    assert baked["merge_method"] == "task_arithmetic" and len(baked["models"]) == len(MODELS)
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "baked.yml"
    target.write_text("# earlier\n")
    os.chmod(target, 0o640)
    (tmp_path / "link.yml").symlink_to(target)
    assert main(["bake", path, str(tmp_path / "link.yml")]) == 0
    assert (tmp_path / "link.yml").is_symlink() and yaml.safe_load(target.read_text()) == baked
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o640)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["baked.yml"]
    capfd.readouterr()
    line = _one_error_line(main(["bake", str(tmp_path / "missing.yml"), str(target)]), capfd.readouterr().err)
    assert "cannot read recipe" in line and "missing.yml" in line, line


def test_inspect_refuses_a_name_it_writes_that_is_not_a_file_before_replacing_any(llama_family, tmp_path, capfd):
    paths, _ = llama_family
    out = tmp_path / "inspect"
    two = write_yaml(recipe(paths, MODELS[:2]), str(tmp_path / "two.yml"))
    assert main(["inspect", two, str(out), "--no-pictures"]) == 0
    (out / "metagpt-report.md").unlink()
    (out / "metagpt-report.md").mkdir()
    (out / "metagpt-report.md" / "x").write_text("")
    before = (out / "metagpt-inspect.json").read_bytes()
    three = write_yaml(recipe(paths, MODELS), str(tmp_path / "three.yml"))
    capfd.readouterr()
    line = _one_error_line(main(["inspect", three, str(out), "--no-pictures"]), capfd.readouterr().err)
    assert f"inspect: cannot write {out / 'metagpt-report.md'}: it is not a file (nothing was written" in line, line
    assert (out / "metagpt-inspect.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["metagpt-inspect.json", "metagpt-report.md"]


def test_inspect_on_a_full_disk_leaves_the_earlier_report_whole(llama_family, tmp_path):
    """No cut-off picture, and not this run's pictures beside an earlier run's report."""
    paths, _ = llama_family
    out = tmp_path / "inspect"
    two = write_yaml(recipe(paths, MODELS[:2]), str(tmp_path / "two.yml"))
    assert main(["inspect", two, str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "metagpt-lambdas.png" in before and "metagpt-report.md" in before
    limit = min(len(v) for k, v in before.items() if k.endswith(".png")) // 2
    three = write_yaml(recipe(paths, MODELS), str(tmp_path / "three.yml"))
    result = _run_with_a_file_size_limit(["inspect", three, str(out)], limit, tmp_path)
    line = _one_error_line(result.returncode, result.stderr)
    assert f"inspect: cannot write the report in {out}: File too large" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bake_reads_its_recipe_once_so_a_pipe_bakes_as_the_file_does(llama_family, tmp_path):
    """bake read the recipe a second time to write it out: from a pipe (`/dev/stdin`,
    `<(...)`) that read got nothing (a TypeError, after the whole pre-pass), and a file edited
    during the pre-pass was written with the λ of its earlier text."""
    paths, _ = llama_family
    path = write_yaml(recipe(paths, MODELS), str(tmp_path / "r.yml"))
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE_DIR=str(tmp_path / "cache"), MERGEKIT_METAGPT_PROGRESS="0")
    with open(path) as f:  # a pipe (a file as stdin could be opened again at its start)
        result = subprocess.run([SCRIPT, "bake", "/dev/stdin", str(tmp_path / "piped.yml")], input=f.read(),
                                capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["bake", path, str(tmp_path / "file.yml")]) == 0
    piped, from_file = (yaml.safe_load((tmp_path / name).read_text()) for name in ("piped.yml", "file.yml"))
    assert piped == from_file and len(piped["models"]) == len(MODELS)


def test_bake_refuses_slices_and_says_why(cli_runs):
    rc, _stdout, stderr, wrote = cli_runs[("bake_slices", "bake")]
    line = _one_error_line(rc, stderr)
    assert "this one has slices:" in line and "its own λ" in line and "coefficients" in line, line
    assert not wrote


def test_bake_refuses_modules_and_says_how_one_module_bakes(llama_family, tmp_path, capsys):
    paths, _ = llama_family
    plain = recipe(paths, ["model0", "model1"])
    modules = {k: v for k, v in plain.items() if k != "models"}
    modules["modules"] = {"default": {"models": plain["models"]}}
    out = str(tmp_path / "baked.yml")
    assert main(["bake", write_yaml(modules, str(tmp_path / "modules.yml")), out]) == 1
    err = capsys.readouterr().err
    assert "this one has modules:" in err and "write it as a models: recipe to bake it" in err, err
    assert not os.path.exists(out)


def test_hub_model_offline_fails_at_once_naming_the_model(cli_runs):
    rc, stdout, stderr, _ = cli_runs[("hub_offline", "coefficients")]
    line = _one_error_line(rc, stderr)
    assert "cannot load model metagpt-test-org/no-such-model" in line, line
    elapsed = float(next(l for l in stdout.splitlines() if l.startswith("ELAPSED")).split()[1])
    assert elapsed < 10.0, elapsed  # no download retries (about 0.1 s unloaded)


def test_mergekit_yaml_refuses_a_per_model_lambda(cli_runs):
    rc, _stdout, stderr, wrote = cli_runs[("per_model_lambda", "mergekit-yaml")]
    assert rc != 0 and "given for a single model (" in stderr and "/model0)" in stderr, stderr
    assert not wrote  # refused before the output folder was made


# -- in-process ---------------------------------------------------------------------------
def test_merge_refuses_what_the_cli_refuses(llama_family, merge_options, tmp_path):
    """run_merge (mergekit-yaml's path) runs the same check_config: per-model lambda and
    weight are refused before anything is read or written."""
    from mergekit_metagpt.errors import MetaGPTError

    paths, _ = llama_family
    for params, text in (({"lambda": 0.5}, "given for a single model"), ({"weight": 0.5}, "mergekit-metagpt bake")):
        out = str(tmp_path / f"out-{next(iter(params))}")
        runs = prepass.STATS.runs
        with pytest.raises(MetaGPTError, match=text):
            run_recipe(_with_model_params(paths, params), out, merge_options)
        assert prepass.STATS.runs == runs and not safetensors_in(out)
        assert not os.path.exists(os.path.join(out, "metagpt_coefficients.json"))


def test_bake_accepts_mergekits_dict_form_of_a_model(llama_family, merge_options, tmp_path, capsys):
    paths, sds = llama_family
    config = recipe(paths, MODELS)
    config["models"] = [{"model": {"model": {"path": paths[m]}}} for m in MODELS]
    source = write_yaml(config, str(tmp_path / "r.yml"))
    baked_path = str(tmp_path / "baked.yml")
    assert main(["bake", source, baked_path]) == 0
    baked = yaml.safe_load(open(baked_path))
    assert baked["merge_method"] == "task_arithmetic" and baked["parameters"]["normalize"] is False
    weights = [m["parameters"]["weight"] for m in baked["models"]]
    assert [m["model"] for m in baked["models"]] == [m["model"] for m in config["models"]]  # the form is kept
    base = sds["base"]
    norms = [sum(float((sds[m][k].double() - base[k].double()).pow(2).sum()) for k in base) for m in MODELS]
    for weight, norm in zip(weights, norms):
        assert abs(weight - norm / sum(norms)) < 1e-7
    # and the baked recipe merges like the original on stock mergekit
    import torch

    a = run_recipe(config, str(tmp_path / "a"), merge_options)
    LoaderCache().flush_all()
    b = run_recipe(baked, str(tmp_path / "b"), merge_options)
    assert all(torch.allclose(a[k], b[k], atol=2e-6, rtol=0) for k in a)


def test_bake_keeps_a_name_with_a_line_break_in_its_comment(llama_family, tmp_path, capsys):
    """A folder named with a line break: the header's comment line ended early, and the rest
    of the name became YAML (the baked file did not load)."""
    paths, _ = llama_family
    odd = str(tmp_path / "ma|th\nmerge_method: linear é")
    os.symlink(paths["model0"], odd)
    config = recipe({**paths, "model0": odd}, MODELS[:2])
    baked_path = str(tmp_path / "baked.yml")
    assert main(["bake", write_yaml(config, str(tmp_path / "r.yml")), baked_path]) == 0
    text = open(baked_path, encoding="utf-8").read()
    baked = yaml.safe_load(text)
    assert baked["merge_method"] == "task_arithmetic"
    assert [m["model"] for m in baked["models"]] == [odd, paths["model1"]]
    assert "linear é" in text  # written as it reads, not as \xE9


def test_coefficients_reports_each_model_set_of_a_slices_recipe(llama_family, tmp_path, capsys):
    paths, sds = llama_family
    path = write_yaml(slices_recipe(paths), str(tmp_path / "slices.yml"))
    names = list(sds["base"])
    first = [k for k in names if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"]
    second = [k for k in names if k not in first]
    expected = []
    for models, tensors in ((["model0", "model1"], first), (["model1", "model2"], second)):
        norms = [sum(float((sds[m][k].double() - sds["base"][k].double()).pow(2).sum()) for k in tensors)
                 for m in models]
        expected.append((models, tensors, [n / sum(norms) for n in norms]))
    assert main(["coefficients", path]) == 0
    text = capsys.readouterr().out
    blocks = text.split("model set ")[1:]
    assert len(blocks) == 2 and blocks[0].startswith("1 of 2") and blocks[1].startswith("2 of 2"), text
    for block, (models, tensors, lams) in zip(blocks, expected):
        assert f"{len(tensors)} tensors" in block.splitlines()[0]
        for model, lam in zip(models, lams):
            row = next(l for l in block.splitlines() if l.startswith(paths[model]))
            assert f"{lam:.6f}" in row, (row, lam)
    assert main(["coefficients", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["merges"]) == 2
    for entry, (models, tensors, lams) in zip(data["merges"], expected):
        assert entry["tensors"] == len(tensors)
        assert [m["model"] for m in entry["models"]] == [paths[m] for m in models]
        for row, lam in zip(entry["models"], lams):
            assert abs(row["lambda"] - lam) < 1e-6


def test_coefficients_text_says_what_the_merge_uses(llama_family, tmp_path, capsys):
    """per_tensor: each model's λ spread besides the whole-set λ; sparse: says so. The
    numbers are the --json ones."""
    paths, _ = llama_family
    config = recipe(paths, MODELS, method="metagpt_ties",
                    parameters={"granularity": "per_tensor", "lambda_from": "sparse", "density": 0.5})
    path = write_yaml(config, str(tmp_path / "r.yml"))
    assert main(["coefficients", path]) == 0
    text = capsys.readouterr().out
    assert main(["coefficients", path, "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["merges"]
    assert "lambda per tensor: min / median / max" in text.splitlines()[0]
    for row in entry["models"]:
        line = next(l for l in text.splitlines() if l.startswith(row["model"]))
        spread = row["lambda_per_tensor"]
        assert f"{row['lambda']:.6f}" in line
        assert f"{spread['min']:.6f} / {spread['median']:.6f} / {spread['max']:.6f}" in line
    assert "granularity: per_tensor" in text and "sparsified task vectors" in text
    # a plain recipe has neither note
    assert main(["coefficients", write_yaml(recipe(paths, MODELS), str(tmp_path / "plain.yml"))]) == 0
    plain = capsys.readouterr().out
    assert "per_tensor" not in plain and "sparsified" not in plain and "per tensor" not in plain


def test_coefficients_takes_a_modules_recipe_whose_slices_each_name_their_base(llama_family, tmp_path, capsys):
    """No top-level base_model: every slice of the `modules:` recipe names one (mergekit-yaml
    merges it); the same λ as the equivalent `slices:` recipe. A slice without one is refused."""
    paths, _ = llama_family
    plain = slices_recipe(paths)
    pieces = [dict(piece, base_model=paths["base"]) for piece in plain["slices"]]
    modules = {"merge_method": "metagpt", "dtype": "float32", "modules": {"default": {"slices": pieces}}}
    assert main(["coefficients", write_yaml(plain, str(tmp_path / "plain.yml")), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["merges"]
    assert main(["coefficients", write_yaml(modules, str(tmp_path / "modules.yml")), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["merges"]
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert [m["model"] for m in a["models"]] == [m["model"] for m in b["models"]]
        assert all(abs(x["lambda"] - y["lambda"]) < 1e-9 for x, y in zip(a["models"], b["models"]))
    del pieces[1]["base_model"]
    path = write_yaml(modules, str(tmp_path / "half.yml"))
    assert main(["coefficients", path]) == 1
    assert "a MetaGPT recipe needs a base_model" in capsys.readouterr().err


def test_coefficients_names_a_misspelt_module(llama_family, tmp_path, capsys):
    """mergekit 0.1.5 says only `KeyError: 'decoder'`; coefficients names the module and the
    architecture's modules (no close match: no guess)."""
    paths, _ = llama_family
    pieces = [dict(piece, base_model=paths["base"]) for piece in slices_recipe(paths)["slices"]]
    modules = {"merge_method": "metagpt", "dtype": "float32", "modules": {"decoder": {"slices": pieces}}}
    assert main(["coefficients", write_yaml(modules, str(tmp_path / "modules.yml"))]) == 1
    err = capsys.readouterr().err
    assert "module 'decoder' of the recipe is not a module of LlamaForCausalLM (it has: default)" in err
    assert "did you mean" not in err and "KeyError" not in err


@pytest.mark.parametrize("command, target, expected", [
    ("bake", "missing/baked.yml", "cannot write {out}: no folder"),
    ("bake", "folder", "{out} is a folder; give the file to write"),
    ("bake", "r.yml", "{out} is the recipe itself"),
    ("inspect", "file", "{out} is a file, not a folder"),
    # a folder that takes no file, even for root
    pytest.param("bake", "/proc/baked.yml", "cannot write {out}: ",
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")),
])
def test_an_output_the_command_cannot_write_is_refused_before_reading(command, target, expected, llama_family,
                                                                      tmp_path, capfd):
    path = write_yaml(recipe(llama_family[0], MODELS), str(tmp_path / "r.yml"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / target)
    recipe_text = open(path).read()
    runs = prepass.STATS.runs
    capfd.readouterr()
    line = _one_error_line(main([command, path, out]), capfd.readouterr().err)
    assert expected.format(out=out) in line, line
    assert prepass.STATS.runs == runs  # refused before the pre-pass
    assert open(path).read() == recipe_text and (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_flag_without_a_gpu_is_refused_at_once(llama_family, tmp_path, capfd):
    """Not torch's AssertionError after planning (cold cache), nor a pass (warm cache)."""
    path = write_yaml(recipe(llama_family[0], MODELS), str(tmp_path / "r.yml"))
    runs = prepass.STATS.runs
    capfd.readouterr()
    line = _one_error_line(main(["coefficients", path, "--cuda"]), capfd.readouterr().err)
    assert "--cuda: torch finds no CUDA device here" in line, line
    assert prepass.STATS.runs == runs


@pytest.mark.parametrize("flags, named", [
    ({"cuda": True}, "--cuda"),
    ({"device": "cuda:1"}, "--device cuda:1"),
    ({"multi_gpu": True}, "--multi-gpu"),
    ({"gpu_rich": True}, "--gpu-rich"),
])
def test_a_cuda_merge_where_torch_finds_no_gpu_is_refused_before_any_read(flags, named, llama_family, tmp_path,
                                                                          monkeypatch):
    """mergekit-yaml --cuda (…) where torch finds no GPU: one line naming the flag, before the
    pre-pass and before mergekit makes the output folder (mergekit's own: torch's
    AssertionError, or for --multi-gpu "'NoneType' object has no attribute 'type'")."""
    import torch
    from mergekit.options import MergeOptions

    from mergekit_metagpt.errors import MetaGPTError

    from mergekit_metagpt.planning import check_device_there

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)
    runs = prepass.STATS.runs
    out = str(tmp_path / "out")
    with pytest.raises(MetaGPTError, match=f"^{re.escape(named)}: torch finds no (CUDA device|GPU) here "
                                           r"\(torch .*\); merge without it, on the CPU$"):
        run_recipe(recipe(llama_family[0], MODELS), out, MergeOptions(copy_tokenizer=False, quiet=True, **flags))
    assert prepass.STATS.runs == runs and not os.path.exists(out)
    # mergekit's multi-GPU executor takes any accelerator torch finds (Intel's XPU): not refused
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("xpu"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda *a, **k: 2)
    check_device_there(MergeOptions(multi_gpu=True, device="xpu"))


def test_demo_models_does_not_overwrite_a_checkpoint_it_did_not_write(tmp_path, capfd):
    """A folder demo-models would write that holds someone's checkpoint is refused, its files
    untouched; its own output it rewrites."""
    real = tmp_path / "models" / "math"
    real.mkdir(parents=True)
    (real / "config.json").write_text('{"model_type": "mistral"}')
    (real / "model.safetensors").write_bytes(b"weights")
    capfd.readouterr()
    line = _one_error_line(main(["demo-models", str(tmp_path / "models")]), capfd.readouterr().err)
    assert f"demo-models: {real} already holds files demo-models did not write " \
           f"(config.json, model.safetensors); give another DIRECTORY" in line, line
    assert (real / "config.json").read_text() == '{"model_type": "mistral"}'
    assert sorted(os.listdir(real)) == ["config.json", "model.safetensors"]
    assert not (tmp_path / "models" / "base").exists()  # refused before writing any
    (tmp_path / "a-file").write_text("x")
    line = _one_error_line(main(["demo-models", str(tmp_path / "a-file")]), capfd.readouterr().err)
    assert line.endswith(f"demo-models: {tmp_path / 'a-file'} is a file; give a folder (DIRECTORY) to write "
                         f"the models in"), line
    assert main(["demo-models", str(tmp_path / "demo")]) == 0
    assert main(["demo-models", str(tmp_path / "demo")]) == 0  # its own folders: rewritten
    for name in ("base", "math", "code", "chat"):  # as an older demo-models left them, unmarked
        os.remove(tmp_path / "demo" / name / ".mergekit-metagpt-demo")
    (tmp_path / "demo" / "base" / ".DS_Store").write_bytes(b"")
    assert main(["demo-models", str(tmp_path / "demo")]) == 0


def test_demo_models_says_what_to_run_next_with_a_recipe_for_its_folders(tmp_path, capfd, monkeypatch):
    """stdout lists the folders; stderr gives the next command: the example recipe where it is
    here and its paths fit, else a recipe for the folders written, which runs as it is."""
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["demo-models", "family", "--dtype", "float32"]) == 0
    out, err = capfd.readouterr()
    assert out.split() == [os.path.join("family", n) for n in ("base", "math", "code", "chat")]
    first, text = err.split("\n", 1)
    assert first == "next: save this recipe as metagpt-demo.yml and run, from this folder, " \
                    "mergekit-yaml metagpt-demo.yml ./merged -v"
    recipe = yaml.safe_load(text)
    assert recipe == {"merge_method": "metagpt", "base_model": "./family/base", "dtype": "float32",
                      "models": [{"model": f"./family/{n}"} for n in ("math", "code", "chat")]}
    (tmp_path / "metagpt-demo.yml").write_text(text)
    assert main(["coefficients", "metagpt-demo.yml"]) == 0
    assert "./family/chat" in capfd.readouterr().out
    assert main(["demo-models", "./tiny-models"]) == 0  # the example's folder, but no example here
    assert capfd.readouterr().err.startswith("next: save this recipe")
    (tmp_path / "examples" / "yaml").mkdir(parents=True)
    (tmp_path / "examples" / "yaml" / "metagpt-tiny.yml").write_text(text)
    assert main(["demo-models", "./tiny-models"]) == 0
    assert capfd.readouterr().err.strip() == "next: mergekit-yaml examples/yaml/metagpt-tiny.yml ./merged-tiny -v"


@pytest.mark.parametrize("terminal, flags, shown", [(True, [], True), (True, ["--quiet"], False),
                                                    (False, [], False)])
def test_the_pre_pass_shows_a_progress_bar_on_a_terminal(terminal, flags, shown, llama_family, tmp_path,
                                                         monkeypatch, capfd):
    """A person at a terminal sees the pre-pass advance (minutes on a 7B model); --quiet and
    output to a file or pipe have none. (Here stderr is captured, so what shows is what the
    pre-pass writes where it draws no bar, its summary; the bar itself: test_progress.)"""
    from mergekit_metagpt import cli

    monkeypatch.delenv("MERGEKIT_METAGPT_PROGRESS")
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: terminal)
    path = write_yaml(recipe(llama_family[0], MODELS), str(tmp_path / "r.yml"))
    capfd.readouterr()
    assert main(["coefficients", path, *flags]) == 0
    err = capfd.readouterr().err
    assert ("MetaGPT norm pre-pass: 21 tensors, " in err) == shown, err


def test_a_plan_without_metagpt_tasks_is_refused_not_reported_empty(llama_family, tmp_path, capfd, monkeypatch):
    """A mergekit whose plan holds its merge tasks where the plugin does not look: the
    command says so (it printed an empty table, and bake failed unpacking nothing)."""
    from mergekit_metagpt import merge_plan

    monkeypatch.setattr(merge_plan, "ours", lambda tasks: [])
    path = write_yaml(recipe(llama_family[0], MODELS), str(tmp_path / "r.yml"))
    for command in (["coefficients", path], ["bake", path, str(tmp_path / "baked.yml")]):
        capfd.readouterr()
        line = _one_error_line(main(command), capfd.readouterr().err)
        assert "no metagpt task found in mergekit's plan of this recipe: the plugin knows the plans of " \
               "mergekit 0.1.5, this is mergekit 0.1.5" in line, line
    assert not os.path.exists(tmp_path / "baked.yml")


def test_bake_pins_hub_models_to_the_commits_of_their_lambdas(llama_family, tmp_path):
    """A baked recipe's weights are the λ of the snapshots read: a hub model named by branch
    (or none: main) is written at that commit, so that a branch moved on later does not take
    the weights to other checkpoints; a commit, a folder, stay as written."""
    from hub import hub_snapshot, run_offline

    paths, _ = llama_family
    cache = str(tmp_path / "hub")
    commits = {m: c * 40 for m, c in (("base", "a"), ("model0", "b"), ("model1", "c"))}
    for model, commit in commits.items():
        hub_snapshot(cache, f"org/{model}", paths[model], commit)
    written = {"base": "org/base", "model0": "org/model0@main", "model1": f"org/model1@{commits['model1']}",
               "model2": paths["model2"]}
    path = write_yaml(recipe(written, ["base", "model0", "model1", "model2"]), str(tmp_path / "r.yml"))
    out = str(tmp_path / "baked.yml")
    result = run_offline("mergekit-metagpt", ["bake", path, out], cache, {"MERGEKIT_METAGPT_CACHE": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        text = f.read()
    baked = yaml.safe_load(text)
    pinned = {"base": f"org/base@{commits['base']}", "model0": f"org/model0@{commits['model0']}",
              "model1": written["model1"], "model2": paths["model2"]}
    assert baked["base_model"] == pinned["base"]
    assert [entry["model"] for entry in baked["models"]] == [pinned[m] for m in ("base", "model0", "model1", "model2")]
    assert "# Hub models pinned to the commits the weights were computed from: org/base -> aaaaaaaaaaaa, " \
           "org/model0@main -> bbbbbbbbbbbb." in text
    # the pinned recipe is one stock mergekit reads, with the base among the models as the base
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(baked)
    assert str(config.base_model) == pinned["base"]


@pytest.mark.parametrize("method", ["metagpt_dare", "metagpt_dare_ties"])
def test_coefficients_and_inspect_draw_sparse_dare_norms_as_a_merge_with_that_seed(method, llama_family, tmp_path,
                                                                                   capsys):
    """metagpt_dare(_ties) with lambda_from: sparse: DARE's masks are random. --random-seed N
    seeds torch where run_merge does (before planning), so the λ printed are those of the
    merge run with that seed; without it they are one draw, and the text says which."""
    from mergekit.options import MergeOptions

    paths, _ = llama_family
    config = recipe(paths, MODELS, method=method, parameters={"density": 0.5, "lambda_from": "sparse"})
    path = write_yaml(config, str(tmp_path / "r.yml"))

    def printed(*flags):
        assert main(["coefficients", path, "--json", *flags]) == 0
        return [m["lambda"] for m in json.loads(capsys.readouterr().out)["merges"][0]["models"]]

    run_recipe(config, str(tmp_path / "out"), MergeOptions(random_seed=3))
    with open(tmp_path / "out" / "metagpt_coefficients.json") as f:
        merged = [m["lambda"] for m in json.load(f)["merges"][0]["models"]]
    assert printed("--random-seed", "3") == merged
    assert printed("--random-seed", "4") != merged  # the seed is what makes them equal
    assert main(["inspect", path, str(tmp_path / "inspect"), "--random-seed", "3", "--no-pictures", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["merges"][0]["lambdas"] == merged
    assert "drawn as by `mergekit-yaml --random-seed 3`" in (tmp_path / "inspect" / "metagpt-report.md").read_text()
    assert main(["coefficients", path]) == 0
    assert "these lambda are one draw (--random-seed N draws them" in capsys.readouterr().out
    assert main(["coefficients", path, "--random-seed", "3"]) == 0
    assert "drawn as by mergekit-yaml --random-seed 3" in capsys.readouterr().out


def test_without_mergekit_the_cli_says_so_in_one_line(tmp_path):
    """mergekit absent (uninstalled, or another environment's): importing the plugin
    registers nothing and raises nothing, --version still prints, and a command that needs
    mergekit says what to install, in one line, not a traceback."""
    recipe_path = tmp_path / "r.yml"
    recipe_path.write_text("merge_method: metagpt\nbase_model: ./base\nmodels:\n  - model: ./a\n")
    code = f"""
import importlib.abc, sys
class NoMergekit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "mergekit":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NoMergekit())
import importlib.metadata
version = importlib.metadata.version
def without_mergekit(name):
    if name == "mergekit":
        raise importlib.metadata.PackageNotFoundError(name)
    return version(name)
importlib.metadata.version = without_mergekit
import mergekit_metagpt
from mergekit_metagpt.cli import main
try:
    main(["--version"])
except SystemExit as done:
    print("version exit", done.code)
print("coefficients exit", main(["coefficients", {str(recipe_path)!r}]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert re.search(r"mergekit-metagpt 0\.1\.0 \(code [0-9a-f]{12}; mergekit not installed", result.stdout), result.stdout
    assert "version exit 0" in result.stdout
    # the hook's line does not say "active" where mergekit is not there to find metagpt
    assert (f"mergekit_metagpt.pth), but mergekit is not installed in this Python ({sys.executable}): "
            "pip install mergekit==0.1.5") in result.stdout, result.stdout
    assert "coefficients exit 1" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"mergekit-metagpt: error: mergekit is not installed in this Python ({sys.executable}): "
        "pip install mergekit==0.1.5"], result.stderr


def test_a_mergekit_without_a_module_the_plugin_needs_is_not_called_absent(tmp_path):
    """Only mergekit itself missing is "not installed": a mergekit that lacks a module (another
    version) fails the import with that module's name, as before."""
    code = """
import importlib.abc, sys
class NoRegistry(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mergekit.merge_methods.registry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRegistry())
try:
    import mergekit_metagpt
except ModuleNotFoundError as error:
    print("import failed:", error.name)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=str(tmp_path))
    assert result.stdout.strip() == "import failed: mergekit.merge_methods.registry", (result.stdout, result.stderr)


def test_text_tables_align_wide_characters_as_a_terminal_shows_them():
    """A model folder named in CJK (two terminal columns a character) pushed its row's λ
    out of the column."""
    import unicodedata

    from mergekit_metagpt.coefficients import text_table

    lines = text_table(["model", "lambda"], [["./数学 demo/math", "0.1"], ["./code", "0.75"]]).splitlines()

    def column_of_last_cell(line):
        head = line.rsplit("  ", 1)[0] + "  "
        return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in head)

    assert len({column_of_last_cell(line) for line in lines}) == 1, lines


def test_a_folder_named_tilde_is_read_as_mergekit_reads_it(llama_family, tmp_path, monkeypatch, capsys):
    """mergekit expands no ~: `~/m` is a folder named "~" here where there is one (stock
    mergekit merges it), and the plugin's checks read it so too (they looked in the home,
    and said "no such folder")."""
    paths, _ = llama_family
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "~").mkdir()
    for name in ("base", "model0", "model1"):
        os.symlink(paths[name], tmp_path / "~" / name)
    tilde = {name: f"~/{name}" for name in ("base", "model0", "model1")}
    assert main(["coefficients", write_yaml(recipe(tilde, ["model0", "model1"]), str(tmp_path / "r.yml")),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["merges"][0]["models"]
    assert [row["model"] for row in rows] == ["~/model0", "~/model1"]


def test_a_reader_gone_before_the_version_is_printed_is_no_traceback():
    """stdout a pipe whose reader is gone (`mergekit-metagpt --version | true`): exit status
    1 and nothing on stderr, as for a command's output (`coefficients … | head`); was a
    BrokenPipeError traceback, the version being printed while the arguments are parsed."""
    args = ["--version"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([SCRIPT, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, "")
