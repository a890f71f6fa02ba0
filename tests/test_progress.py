"""The pre-pass progress bar: shown by default, hidden by mergekit's quiet option.

The bar follows the merge's own MergeOptions.quiet, never the process's command line:
a library caller's sys.argv may say anything.
"""

import re
import sys

import pytest

from merging import recipe, run_recipe
from mergekit_metagpt import prepass


@pytest.mark.parametrize("quiet, argv", [
    (False, ["prog"]),
    (False, ["prog", "--quiet"]),  # someone else's --quiet: the bar still shows
    (True, ["prog"]),  # no --quiet on the command line: the option alone hides it
])
def test_progress_bar_follows_quiet(quiet, argv, llama_family, tmp_path, monkeypatch, capsys):
    from mergekit.options import MergeOptions

    monkeypatch.delenv("MERGEKIT_METAGPT_PROGRESS")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")  # the pre-pass really runs
    monkeypatch.setattr(sys, "argv", argv)
    prepass.clear_memo()
    options = MergeOptions(copy_tokenizer=False, quiet=quiet)
    runs = prepass.STATS.runs
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), options)
    assert prepass.STATS.runs == runs + 1
    err = capsys.readouterr().err
    assert ("MetaGPT norm pre-pass" in err) is (not quiet)
    if not quiet:
        assert "GB read" in err


def test_progress_can_be_turned_off_by_environment(llama_family, tmp_path, monkeypatch, capsys):
    from mergekit.options import MergeOptions

    monkeypatch.setenv("MERGEKIT_METAGPT_PROGRESS", "0")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    prepass.clear_memo()
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, quiet=False))
    assert "MetaGPT norm pre-pass" not in capsys.readouterr().err


def test_log_lines_of_the_pre_pass_are_not_glued_to_mergekits_bar(llama_family, tmp_path):
    """mergekit-yaml's "Executing graph" bar leaves its line open in a file or pipe; the
    pre-pass's records came on that line (``Executing graph: 0%|…|INFO:mergekit_metagpt:…``),
    so a grep for the bar hid them. Each starts a line of its own, cold and warm."""
    import os
    import subprocess

    from merging import write_yaml

    config = write_yaml(recipe(llama_family[0], ["model0", "model1", "model2"]), str(tmp_path / "r.yml"))
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    for run in ("cold", "warm"):
        result = subprocess.run([script, config, str(tmp_path / run), "--no-copy-tokenizer", "-v"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Executing graph" in result.stderr  # the bar is there (not --quiet)
        ours = [line for line in result.stderr.split("\n") if "INFO:mergekit_metagpt:" in line]
        assert ours and all(line.startswith("INFO:mergekit_metagpt:") for line in ours), ours
        # no stale copy of mergekit's bar cleared before each record (tqdm's clear-and-redraw,
        # meant for terminals, wrote one with a run of blanks into the log)
        # (text mode reads tqdm's \r as a line end: a clearing run of blanks is a line of them)
        assert not [line for line in result.stderr.split("\n") if len(line) >= 20 and not line.strip()], \
            result.stderr[-3000:]
        if run == "warm":
            cached = [line for line in ours if "from the norm cache" in line]
            assert len(cached) == 3
            # in the recipe's order (was a set's: another order each run)
            assert [line.split(" of ")[1].split(" from")[0] for line in cached] == [
                llama_family[0][m] for m in ("model0", "model1", "model2")]


def test_the_pre_pass_writes_lines_not_a_bar_into_a_file_or_pipe(llama_family, tmp_path):
    """Into a log (> log 2>&1, nohup, a job scheduler) a second tqdm bar under mergekit's
    wrote a new line with cursor codes at every refresh; there the pre-pass writes one
    summary line instead (and a line every LINE_EVERY_S seconds of a long pass). Without
    -v, a line gives the λ (the log shows no table); --quiet: nothing of either."""
    import os
    import subprocess

    from checkpoints import closed_form
    from merging import write_yaml

    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds["model0"], sds["model1"]])
    config = write_yaml(recipe(paths, ["model0", "model1"]), str(tmp_path / "r.yml"))
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE="0")
    env.pop("MERGEKIT_METAGPT_PROGRESS", None)
    for flags in ([], ["-v"]):
        result = subprocess.run([script, config, str(tmp_path / "out"), "--no-copy-tokenizer", *flags],
                                capture_output=True, timeout=600, env=env)
        err = result.stderr.decode("utf-8", "replace")  # as written: tqdm's \r kept
        assert result.returncode == 0, err[-3000:]
        lines = err.split("\n")
        at = [i for i, line in enumerate(lines) if "MetaGPT norm pre-pass" in line]
        assert len(at) == 1 and re.fullmatch(r"MetaGPT norm pre-pass: \d+ tensors, \d+\.\d\d GB read in "
                                             r"\d+\.\d s", lines[at[0]]), [lines[i] for i in at]
        assert lines[at[0] - 1].strip(), err[-3000:]  # no blank line: only a bar's open line is ended first
        assert "\x1b[A" not in err  # no cursor-up of a nested bar
        # the λ in one line where the log shows no table (mergekit's default verbosity)
        said = [line for line in lines if line.startswith("MetaGPT λ")]
        assert said == ([] if flags else [
            f"MetaGPT λ: model0 {lams[0]:.3g}, model1 {lams[1]:.3g} (-v logs the table; the record: "
            f"{tmp_path / 'out' / 'metagpt_coefficients.json'})"]), said
    quiet = subprocess.run([script, config, str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert quiet.returncode == 0 and "MetaGPT" not in quiet.stderr, quiet.stderr[-3000:]


def test_a_failure_of_the_lambda_line_is_warned_of_and_the_merge_goes_on(llama_family, tmp_path, monkeypatch,
                                                                         caplog):
    """The one-line λ summary is output, not the merge: a bug in it is a WARNING naming the
    error (it was a DEBUG line), and the merge and its record are written."""
    import os

    from mergekit.options import MergeOptions

    def broken(run):
        raise KeyError("granularity")

    monkeypatch.setattr(prepass, "_say_lambdas", broken)
    prepass.clear_memo()
    out = str(tmp_path / "out")
    run_recipe(recipe(llama_family[0], ["model0", "model1"]), out, MergeOptions(copy_tokenizer=False))
    assert os.path.exists(os.path.join(out, "metagpt_coefficients.json"))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "λ line" in r.getMessage()]
    assert warned == ["MetaGPT: the λ line was not written (KeyError: 'granularity'); the record and -v's table "
                      "have them"], warned


def test_a_long_pre_pass_writes_a_line_now_and_then_into_a_file_or_pipe(llama_family, tmp_path, monkeypatch, capsys):
    from mergekit.options import MergeOptions
    from mergekit_metagpt import progress

    monkeypatch.delenv("MERGEKIT_METAGPT_PROGRESS")
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # every tensor counts as long enough
    prepass.clear_memo()
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), MergeOptions(copy_tokenizer=False))
    lines = [line for line in capsys.readouterr().err.split("\n") if line.startswith("MetaGPT norm pre-pass: ")]
    assert len(lines) > 3 and "/" in lines[0] and lines[0].endswith(" s"), lines
    assert "/" not in lines[-1] and " GB read in " in lines[-1], lines  # the summary, last


def test_on_a_terminal_the_pre_pass_draws_a_bar_and_leaves_a_summary(llama_family, tmp_path):
    """On a terminal (a pseudo-terminal here) the bar is drawn under mergekit's, and the
    summary line written when the pass ends (what is written in a file or pipe alone)."""
    pty = pytest.importorskip("pty")
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    import os
    import struct
    import subprocess

    from merging import write_yaml

    config = write_yaml(recipe(llama_family[0], ["model0", "model1"]), str(tmp_path / "r.yml"))
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE="0")
    env.pop("MERGEKIT_METAGPT_PROGRESS", None)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # else 0 columns: no bars
    process = subprocess.Popen([script, config, str(tmp_path / "out"), "--no-copy-tokenizer"],
                               stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=600) == 0, seen[-3000:]
    text = seen.decode("utf-8", "replace")
    assert re.search(r"MetaGPT norm pre-pass: +\d+%\|", text), text[-3000:]  # the bar
    assert re.search(r"MetaGPT norm pre-pass: \d+ tensors, \d+\.\d\d GB read in \d+\.\d s", text), text[-3000:]


def test_the_console_handlers_are_given_back_after_the_pre_pass(llama_family, tmp_path, monkeypatch):
    """While the pre-pass runs, a stand-in writes the root logger's console records; after
    it (and after a failed one) the root logger has its own handlers again."""
    import logging

    from mergekit.options import MergeOptions
    from mergekit_metagpt import progress

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(root, "handlers", root.handlers + [console])
    seen = []
    real = prepass.compute
    monkeypatch.setattr(prepass, "compute", lambda *a, **k: seen.append(list(root.handlers)) or real(*a, **k))
    before = list(root.handlers)
    run_recipe(recipe(llama_family[0], ["model0"]), str(tmp_path / "out"), MergeOptions(copy_tokenizer=False))
    assert root.handlers == before
    assert console not in seen[0] and any(isinstance(h, progress._LineAboveBars) and h.original is console
                                          for h in seen[0])

    def failing(*a, **k):
        raise RuntimeError("a pre-pass that fails")

    monkeypatch.setattr(prepass, "compute", failing)
    prepass.clear_memo()
    with pytest.raises(Exception, match="a pre-pass that fails"):
        run_recipe(recipe(llama_family[0], ["model1"]), str(tmp_path / "out2"), MergeOptions(copy_tokenizer=False))
    assert root.handlers == before


def test_a_bar_that_stalled_past_tqdms_monitor_interval_counts_as_drawn_again():
    """tqdm's monitor thread redraws a bar stalled for `maxinterval` without noting when:
    the pre-pass stalls mergekit's bar that long on real models, so a line written then
    ends the bar's line first (at worst an empty line), not glued to it."""
    import io
    import time

    import tqdm
    from mergekit_metagpt import progress

    stream = io.StringIO()
    bar = tqdm.tqdm(total=10, file=stream, mininterval=0)
    try:
        progress._LINE_ENDED[stream] = time.time()
        bar.last_print_t = time.time() - 1  # drawn before that line, not stalled: closed
        assert not progress._bar_line_open(stream)
        bar.last_print_t = time.time() - bar.maxinterval - 1  # stalled: the monitor may have redrawn it
        assert progress._bar_line_open(stream) is bool(tqdm.tqdm.monitor_interval)
    finally:
        bar.close()
        progress._LINE_ENDED.pop(stream, None)


def test_streams_written_to_are_not_kept_alive_and_any_stream_takes_a_line():
    """A notebook or service gives each run a fresh stderr: the note of when a line last ended
    on a stream holds it weakly (none kept after the run), and a stream that takes no weak
    reference still gets its lines."""
    import gc
    import io
    import weakref

    from mergekit_metagpt import progress

    written = []  # this test's own streams (another test's may be collected meanwhile)
    for _ in range(20):
        stream = io.StringIO()
        progress._write_line(stream, "a line")
        assert stream.getvalue() == "a line\n" and stream in progress._LINE_ENDED
        written.append(weakref.ref(stream))
    del stream
    gc.collect()
    assert all(ref() is None for ref in written)

    class Slotted:
        __slots__ = ("lines",)

        def __init__(self):
            self.lines = []

        def write(self, text):
            self.lines.append(text)

        def flush(self):
            pass

    slotted = Slotted()
    progress._write_line(slotted, "another")
    assert "".join(slotted.lines) == "another\n"


def test_progress_into_a_closed_stderr_does_not_fail_the_pass(monkeypatch):
    import io

    from mergekit_metagpt import progress

    monkeypatch.delenv("MERGEKIT_METAGPT_PROGRESS")
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    with progress.progress_bar(total=2, desc="MetaGPT norm pre-pass") as bar:
        bar.update(1, 10)
        bar.update(1, 10)


def test_mergekit_pytorch_follows_its_quiet_option_and_says_per_tensor_shares_are_global(llama_family, tmp_path):
    """mergekit-pytorch plans without run_merge: its --quiet reaches the pre-pass through
    its command (the bar and the λ line showed through it). Without --quiet, the λ line
    says when the recipe merges each tensor with its own λ."""
    import os
    import subprocess

    from safetensors.torch import save_file

    from checkpoints import load_checkpoint
    from merging import write_yaml

    paths, _ = llama_family
    files = {}
    for name in ("base", "model0", "model1"):
        files[name] = str(tmp_path / f"{name}.safetensors")
        save_file(load_checkpoint(paths[name]), files[name])
    config = write_yaml({"merge_method": "metagpt", "base_model": files["base"],
                         "parameters": {"granularity": "per_tensor"},
                         "models": [{"model": files["model0"]}, {"model": files["model1"]}]}, str(tmp_path / "r.yml"))
    script = os.path.join(os.path.dirname(sys.executable), "mergekit-pytorch")
    env = dict(os.environ, MERGEKIT_METAGPT_CACHE="0")
    env.pop("MERGEKIT_METAGPT_PROGRESS", None)
    for flags in ([], ["--quiet"]):
        result = subprocess.run([script, config, str(tmp_path / "out"), *flags], capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        ours = [line for line in result.stderr.splitlines() if line.startswith("MetaGPT")]
        if flags:
            assert ours == [], ours
        else:
            assert len(ours) == 2 and ours[0].startswith("MetaGPT norm pre-pass: "), ours
            assert ours[1].startswith("MetaGPT λ (global shares; granularity per_tensor merges each tensor with its "
                                      "own): model0.safetensors "), ours


def test_the_lambda_line_names_the_record_where_mergekit_writes_it():
    """`mergekit-yaml r.yml "~/out"` (quoted: no shell expands it) writes into a folder named
    "~" here, not the home's: the λ line says ./~/out, where it said ~/out."""
    import os

    assert prepass._as_written("~/out") == os.path.join(".", "~/out")
    assert prepass._as_written("out/x") == "out/x" and prepass._as_written("/abs/out") == "/abs/out"


@pytest.mark.parametrize("scale", [0.5, 0])
def test_the_lambda_line_says_the_recipes_scale_and_a_zero_scale_is_warned_of(scale, llama_family, tmp_path,
                                                                              monkeypatch, capsys, caplog):
    """Without -v the one λ line is all the log says of the λ: it adds a `lambda` that is not
    1 (the shares listed are then not what the merge adds), and `lambda: 0`, whose merge
    writes the base model, is a warning."""
    import logging

    import torch

    from checkpoints import closed_form
    from mergekit.options import MergeOptions

    paths, sds = llama_family
    lams, _ = closed_form(sds["base"], [sds["model0"], sds["model1"]])
    monkeypatch.setenv("MERGEKIT_METAGPT_CACHE", "0")
    monkeypatch.delenv("MERGEKIT_METAGPT_PROGRESS", raising=False)
    prepass.clear_memo()
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="mergekit_metagpt"):
        merged = run_recipe(recipe(paths, ["model0", "model1"], parameters={"lambda": scale}), out,
                            MergeOptions(copy_tokenizer=False))
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("MetaGPT λ")]
    assert said == [f"MetaGPT λ: model0 {lams[0]:.3g}, model1 {lams[1]:.3g}; each times lambda {scale:g} (-v logs "
                    f"the table; the record: {tmp_path / 'out' / 'metagpt_coefficients.json'})"], said
    warned = [r.getMessage() for r in caplog.records if "adds no task vector" in r.getMessage()]
    assert warned == (["MetaGPT: lambda: 0 (the recipe's scale) adds no task vector: the merge writes the base "
                       "model's weights"] if scale == 0 else []), warned
    name = "model.layers.0.mlp.up_proj.weight"
    expected = sds["base"][name].double() + scale * sum(
        lam * (sds[m][name].double() - sds["base"][name].double()) for lam, m in zip(lams, ["model0", "model1"]))
    assert torch.allclose(merged[name].double(), expected, atol=1e-6)
