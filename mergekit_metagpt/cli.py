"""The ``mergekit-metagpt`` command: coefficients of a recipe, bake, inspect, and demo checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from typing import List, Optional

from mergekit_metagpt.errors import MetaGPTError


@contextlib.contextmanager
def _transformers_errors_only():
    """transformers' warnings off while planning (e.g. mergekit's out config sets the
    deprecated ``torch_dtype``): they would bury the CLI's table or its one error line
    (warnings of mergekit's own loggers, and ours, still reach stderr)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - mergekit depends on transformers
        yield
        return
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


#: mergekit-yaml options that change what a merge reads (and so its λ), passed through.
PLANNING_FLAGS = {
    "trust_remote_code": "trust remote code in model configs (as mergekit-yaml's option)",
    "lazy_unpickle": "mergekit's lazy unpickler for .bin checkpoints",
    "allow_crimes": "allow mixing architectures (as mergekit-yaml's option)",
    "unsafe_truncate_embeddings": "truncate vocabularies to the smallest (as mergekit-yaml's "
                                  "option; the norms then count those rows)",
}


#: mergekit-yaml options with a value that change what a merge reads: LoRA adapters
#: (``model: base+adapter``) are merged by mergekit into ``--lora-merge-cache``, in
#: ``--lora-merge-dtype`` (which changes the merged weights, and so λ); hub models are found
#: under ``--transformers-cache``.
PLANNING_SETTINGS = {
    "lora_merge_cache": ("DIR", "where mergekit stores models merged with their LoRA adapters "
                                      "(as mergekit-yaml's option; needed for `model+adapter` references)"),
    # checked before any adapter is merged (planning): mergekit makes the adapter's cache
    # folder before it reads the dtype, and a later run reuses that empty folder
    "lora_merge_dtype": ("DTYPE", "dtype in which LoRA adapters are merged: bfloat16, float16, float32 "
                                        "or float64 (as mergekit-yaml's option; checked when the recipe "
                                        "has a LoRA adapter)"),
    "transformers_cache": ("DIR", "where hub models are stored (as mergekit-yaml's option)"),
}


def _options(args):
    from mergekit.options import MergeOptions

    flags = {name: bool(getattr(args, name, False)) for name in PLANNING_FLAGS}
    settings = {name: getattr(args, name, None) for name in PLANNING_SETTINGS}
    # the pre-pass's progress bar, on stderr, where a person watches it
    quiet = bool(getattr(args, "quiet", False)) or not _is_terminal(sys.stderr)
    # seeds torch as mergekit-yaml's --random-seed does: DARE's masks of lambda_from: sparse
    seed = {"random_seed": args.random_seed} if getattr(args, "random_seed", None) is not None else {}
    return MergeOptions(quiet=quiet, **flags, **settings, **seed)


def _is_terminal(stream) -> bool:  # a name of its own here: tests stand a terminal in for stderr
    from mergekit_metagpt.progress import is_terminal

    return is_terminal(stream)


def _plan_and_norms(recipe_path: str, cuda: bool, options, before_planning=None, products=None,
                    before_norms=None, text=None):
    """Validate and plan the recipe as ``mergekit-yaml`` would, then run the pre-pass;
    ``before_planning(config)`` and ``before_norms(run)`` refuse what a command cannot do
    before anything is read."""
    import torch

    import mergekit_metagpt  # noqa: F401  (registers the methods)
    from mergekit_metagpt.planning import plan_recipe
    from mergekit_metagpt.prepass import run_norms
    from mergekit_metagpt.recipe import check_metagpt, load_recipe
    from mergekit_metagpt.registration import methods

    if cuda and not torch.cuda.is_available():  # else: a warm cache needs no GPU, a cold one fails late
        raise MetaGPTError("--cuda: torch finds no CUDA device here")
    config = load_recipe(recipe_path, text)
    check_metagpt(config, recipe_path)
    if before_planning is not None:
        before_planning(config)
    if options.random_seed is not None:  # where run_merge seeds, before planning
        import transformers.trainer_utils

        transformers.trainer_utils.set_seed(options.random_seed)
    with _transformers_errors_only():
        run = plan_recipe(config, options)
    if before_norms is not None:
        before_norms(run)
    method = next(m for m in methods() if m.spec.name == run.method_name)
    run_norms(run, torch.device("cuda" if cuda else "cpu"), method, products=products)
    return run


def _table(entry) -> str:
    """One model set's plain-text table, from its record entry (the JSON's numbers)."""
    from mergekit_metagpt.coefficients import text_table
    from mergekit_metagpt.record import model_row, per_tensor_count, per_tensor_of

    per_tensor = per_tensor_count(entry)
    header = ["model", "||delta||^2", "lambda"]
    if per_tensor:
        header.append(f"lambda per tensor{per_tensor_of(entry)}: min / median / max")
    return text_table(header, [model_row(row, bool(per_tensor)) for row in entry["models"]])


def coefficients_text(payload, seed=None, places=None) -> str:
    """``coefficients`` without --json: the record's numbers as tables, per model set."""
    from mergekit_metagpt.coefficients import formula, scale_note
    from mergekit_metagpt.inspect_report import one_draw
    from mergekit_metagpt.method import RANDOM_DROP
    from mergekit_metagpt.record import passed_through_text, per_tensor_count, sparse_norms

    merges = payload["merges"]
    blocks = []
    for number, entry in enumerate(merges, 1):
        lines = []
        if len(merges) > 1:
            place = (places or [""] * len(merges))[number - 1]
            lines.append(f"model set {number} of {len(merges)}: base {entry['base_model']}, "
                         f"{entry['tensors']} tensors{', ' + place if place else ''}")
        lines.append(_table(entry))
        blocks.append("\n".join(lines))
    notes = []
    if any(per_tensor_count(e) for e in merges):
        notes.append("granularity: per_tensor: each such tensor is merged with the lambda of its own norms; "
                     "'lambda' is over the whole model set (and merges the set's other tensors)")
    scaled = [scale_note(e.get("lambda", 1.0), ascii=True) for e in merges]
    if any(scaled):
        notes.append(next(n for n in scaled if n) if len(set(scaled)) == 1
                     else "; ".join(f"model set {i}: {n}" for i, n in enumerate(scaled, 1) if n))
    if any(e.get("alpha", 1.0) != 1.0 for e in merges):
        notes.append(f"tempered: {formula([e['alpha'] for e in merges], ascii=True)} "
                     "(alpha 1 is the paper, 0 the average)")
    if payload["passed_through"]:
        notes.append(passed_through_text(payload["passed_through"], ascii=True))
    if sparse_norms(payload):
        notes.append("lambda_from: sparse: the norms are of the sparsified task vectors"
                     + ("; " + one_draw(seed, "these lambda") if payload["merge_method"] in RANDOM_DROP else ""))
    return "\n\n".join(blocks) + ("\n\n" + "\n".join(notes) if notes else "")


def _coefficients(args) -> int:
    from mergekit_metagpt.record import record_payload

    run = _plan_and_norms(args.recipe, args.cuda, _options(args))
    payload = record_payload(run)
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        from mergekit_metagpt.inspect_report import set_places

        print(coefficients_text(payload, args.random_seed, set_places(run)))
    return 0


def _check_writable(path: str, folder: bool, recipe: str) -> None:
    """Refuse, before the pre-pass reads anything, an output the command could not write."""
    from mergekit_metagpt.merge_plan import same_folder

    parent = os.path.dirname(os.path.abspath(path))  # as written (a quoted ~ is a folder named ~)
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise MetaGPTError(f"{path} is a file, not a folder")
        return  # made (with its parents) when written
    if os.path.isdir(path):
        raise MetaGPTError(f"{path} is a folder; give the file to write")
    if not os.path.isdir(parent):
        raise MetaGPTError(f"cannot write {path}: no folder {parent}")
    if same_folder(path, recipe):
        raise MetaGPTError(f"{path} is the recipe itself; give another file to write")
    try:  # a file the folder takes (permissions, a read-only or special file system)
        if os.path.exists(path):  # a file you may not write is not replaced either
            with open(path, "a", encoding="utf-8"):
                pass
        if not os.path.exists(path) or os.path.isfile(path):  # a pipe or /dev/stdout is written directly
            # a regular file is written beside the file it replaces (a link's), then renamed over it
            fd, probe = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.realpath(path)))
            os.close(fd)
            os.remove(probe)
    except OSError as error:
        raise MetaGPTError(f"cannot write {path}: {error.strerror or error}") from None


def _bake(args) -> int:
    from mergekit_metagpt.atomic_files import write_text
    from mergekit_metagpt.bake import baked_recipe, check_bakeable, check_bakeable_recipe
    from mergekit_metagpt.recipe import read_recipe_text

    _check_writable(args.output, folder=False, recipe=args.recipe)
    recipe_text = read_recipe_text(args.recipe)  # once: bake writes the recipe its λ were computed from
    run = _plan_and_norms(args.recipe, args.cuda, _options(args), text=recipe_text,
                          before_planning=lambda c: check_bakeable_recipe(c, args.recipe),
                          before_norms=lambda r: check_bakeable(r, args.recipe))
    (set_norms,) = run.result.sets
    text = baked_recipe(args.recipe, set_norms.coefficients, recipe_text)
    stream = os.path.exists(args.output) and not os.path.isfile(args.output)  # a pipe, /dev/fd/1
    try:
        if stream:  # no rename
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        else:  # all or nothing: a recipe cut short by a full disk is YAML that merges other weights
            write_text(args.output, text)
    except OSError as error:
        raise MetaGPTError(f"cannot write {args.output}: {error.strerror or error}") from None
    if not stream:  # else stdout may be that pipe (bake r.yml /dev/fd/1 | mergekit-yaml /dev/stdin out)
        print(f"wrote {args.output}")
    return 0


def _inspect(args) -> int:
    from mergekit_metagpt import inspect_report, plots

    _check_writable(args.out_dir, folder=True, recipe=args.recipe)
    run = _plan_and_norms(args.recipe, args.cuda, _options(args), products="always")
    drawn = not args.no_pictures and plots.available()
    written = inspect_report.write(run, args.recipe, args.out_dir, pictures=not args.no_pictures)
    if args.json:
        print(json.dumps(inspect_report.payload(run, args.recipe), indent=2))
    else:
        print(inspect_report.summary_text(run, written, drawn or args.no_pictures))
    return 0


def _demo_models(args) -> int:
    from mergekit_metagpt.synthetic import SIZES, refuse_foreign_folders, write_family

    refuse_foreign_folders(args.directory)
    paths = write_family(args.directory, SIZES[args.size], dtype=args.dtype)
    print("\n".join(paths))
    print(_next_step(paths, args.dtype), file=sys.stderr)
    return 0


def _next_step(paths, dtype: str) -> str:
    """What to run next (on stderr: stdout lists the folders): the example recipe where it is
    here and its paths fit, else that recipe's text for these folders."""
    example = os.path.join("examples", "yaml", "metagpt-tiny.yml")
    if os.path.abspath(os.path.dirname(paths[0])) == os.path.abspath("tiny-models") and os.path.isfile(example):
        return f"next: mergekit-yaml {example} ./merged-tiny -v"
    # relative paths start with ./ (else mergekit may take them for hub ids)
    local = [p if os.path.isabs(p) or p.startswith(".") else os.path.join(".", p) for p in paths]
    import yaml

    recipe = {"merge_method": "metagpt", "base_model": local[0], "dtype": dtype,
              "models": [{"model": p} for p in local[1:]]}
    return ("next: save this recipe as metagpt-demo.yml and run, from this folder, "
            "mergekit-yaml metagpt-demo.yml ./merged -v\n" + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip())


def _add_seed(parser) -> None:
    parser.add_argument("--random-seed", metavar="N", type=int, default=None,
                        help="as mergekit-yaml's: metagpt_dare(_ties) with lambda_from: sparse then draws the "
                             "masks of its norms as that merge does")


def _add_planning_flags(parser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (shown on a terminal while the pre-pass reads the models)")
    for name, help_text in PLANNING_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)
    for name, (metavar, help_text) in PLANNING_SETTINGS.items():
        parser.add_argument("--" + name.replace("_", "-"), metavar=metavar, default=None, help=help_text)


def version_text() -> str:
    """This plugin's version, what it runs with, and whether its start-up hook is active in
    this Python (without it, ``mergekit-yaml`` says "Unimplemented merge method metagpt")."""
    import importlib.metadata
    import platform

    from mergekit_metagpt import __version__

    def version_of(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    hook_dir = _hook_folder()
    mergekit_version = version_of("mergekit")
    # the finder's mark: set by the .pth line, or by this command's own import of the
    # package (so the .pth file must be there too); unset where the hook failed to import
    installed = getattr(sys, "_mergekit_metagpt_hook_installed", False)
    import mergekit_metagpt
    from mergekit_metagpt.errors import one_line

    broken = mergekit_metagpt.MERGEKIT_IMPORT_ERROR
    if hook_dir and installed and mergekit_version == "not installed":
        hook = (f"start-up hook: installed ({os.path.join(hook_dir, 'mergekit_metagpt.pth')}), but mergekit "
                f"is not installed in this Python ({sys.executable}): pip install mergekit==0.1.5")
    elif broken is not None:
        fix = ("pip install --force-reinstall mergekit==0.1.5, which installs the dependencies it asks for"
               if mergekit_version == "0.1.5" else "this plugin is made for mergekit 0.1.5: pip install mergekit==0.1.5")
        hook = (f"start-up hook: NOT active: mergekit {mergekit_version} fails to import in this Python "
                f"({one_line(broken)}), and so mergekit-yaml fails too; {fix}")
    elif hook_dir and installed:
        hook = (f"start-up hook: active ({os.path.join(hook_dir, 'mergekit_metagpt.pth')}): "
                "mergekit-yaml and mergekit's Python API find metagpt, metagpt_ties, "
                "metagpt_dare and metagpt_dare_ties without an import")
    else:
        why = (f": {os.path.join(hook_dir, 'mergekit_metagpt.pth')} is there, but its module "
               "mergekit_metagpt_hook did not install (another or a broken copy first on sys.path?)"
               if hook_dir else
               f" in this Python ({sys.executable}): no mergekit_metagpt.pth where it reads .pth "
               "files at start-up (python -S, or a --target/PYTHONPATH install, whose .pth files "
               "Python does not read)")
        hook = (f"start-up hook: NOT active{why}, so mergekit-yaml will say 'Unimplemented merge "
                "method metagpt'; install with pip into the environment that runs mergekit-yaml, "
                "or `import mergekit_metagpt` before merging from Python")
    from mergekit_metagpt.code_digest import code_digest

    return (f"mergekit-metagpt {__version__} (code {code_digest() or 'unknown'}; mergekit {mergekit_version}, "
            f"torch {version_of('torch')}, Python {platform.python_version()})\n{hook}\n{_mergekit_yaml_line()}")


def _script_python(script: str) -> Optional[str]:
    """The Python a console script runs, from its first line (pip's ``#!python``, or for
    a long path a ``/bin/sh`` line and then ``exec`` of the Python), or on Windows from the
    ``#!`` line pip's launcher (``mergekit-yaml.exe``) holds after its program; None where it
    cannot be told (``#!/usr/bin/env python``, another program)."""
    import re

    try:
        with open(script, "rb") as f:
            head = f.read(2048)
            if head.startswith(b"MZ"):  # a Windows program: pip's launcher, then #!, then a zip
                found = re.findall(rb'#!"?([^"\r\n]*?(?:python|pypy)[\d.]*\.exe)"?\r?\n',
                                   head + f.read(8 << 20), re.IGNORECASE)
                return found[-1].decode("utf-8", "replace") if found else None
            head = head.decode("utf-8", "replace")
    except OSError:
        return None
    lines = head.splitlines()
    if not lines or not lines[0].startswith("#!"):
        return None
    python = lines[0][2:].strip().split(" ")[0]
    if os.path.basename(python) == "sh":
        found = re.search(r"exec' \"?([^\"\n]+?)\"? \"\$0\"", head)
        python = found.group(1) if found else ""
    # a Python (python3.11, pypy3), not a wrapper script's shell or `env`
    if not python or not re.fullmatch(r"(python|pypy)[\d.]*(\.exe)?", os.path.basename(python)):
        return None
    return python


def _mergekit_yaml_line() -> str:
    """Which ``mergekit-yaml`` this shell finds, and whether it runs this Python or, if not,
    a Python that has this plugin too (a merge run by another environment's mergekit-yaml
    says "Unimplemented merge method metagpt", while this command, here, says all is well)."""
    import shutil
    import subprocess

    from mergekit_metagpt.merge_plan import same_folder

    found = shutil.which("mergekit-yaml")
    own = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    if os.name == "nt":  # Scripts\mergekit-yaml.exe (beside python.exe in a venv only)
        import sysconfig

        own = os.path.join(sysconfig.get_path("scripts"), "mergekit-yaml.exe")
    if found is None:
        return "mergekit-yaml: not on PATH" + (f" (this Python's: {own})" if os.path.exists(own) else "")
    python = _script_python(found)
    if python is None:
        return f"mergekit-yaml: {found}"
    if same_folder(python, sys.executable) and \
            os.path.realpath(os.path.dirname(python)) == os.path.realpath(os.path.dirname(sys.executable)):
        return f"mergekit-yaml: {found} (this Python's)"  # (two venvs' pythons link to one binary)
    # run in an empty folder of its own: `python -c` imports from the folder it runs in
    # first, so a checkout of this repository there would be found as if installed, and in a
    # shared folder (/tmp) anyone's `importlib.py` would run (the probe's own import)
    probe = ("import sys, importlib.util as u; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
             "print(u.find_spec('mergekit_metagpt') is not None and u.find_spec('mergekit_metagpt_hook') is not None)")
    try:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mergekit-metagpt-probe-") as empty:
            answer = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30,
                                    cwd=empty).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        answer = ""
    if answer == "True":
        return f"mergekit-yaml: {found}, of another Python ({python}), which has mergekit-metagpt too"
    instead = f", or run this Python's: {own}" if os.path.exists(own) else ""
    has = "has no mergekit-metagpt" if answer == "False" else "may lack mergekit-metagpt"
    return (f"mergekit-yaml: {found} (WARNING: it runs another Python, {python}, which {has}: a "
            f"MetaGPT recipe there ends in 'Unimplemented merge method metagpt'. Install mergekit-metagpt "
            f"into that Python ({python} -m pip install …){instead})")


def _hook_folder() -> Optional[str]:
    """The site-packages folder whose ``mergekit_metagpt.pth`` Python ran at start-up, or None
    (run without ``site``, or the file is in no folder Python reads ``.pth`` files from)."""
    import site

    if sys.flags.no_site:
        return None
    folders = list(getattr(site, "getsitepackages", lambda: [])())
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "mergekit_metagpt.pth")):
            return folder
    return None


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergekit-metagpt", description="MetaGPT tools for mergekit recipes"
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions (and a digest of this plugin's code), and whether the start-up "
                        "hook is active, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    coeff = sub.add_parser("coefficients", help="print each model's ||delta||^2 and lambda, per model set")
    coeff.add_argument("recipe", metavar="RECIPE.yml", help="a mergekit recipe (merge_method metagpt, metagpt_ties, metagpt_dare or metagpt_dare_ties)")
    coeff.add_argument("--json", action="store_true",
                       help="print JSON (the shape of the merge's metagpt_coefficients.json)")
    coeff.add_argument("--cuda", action="store_true", help="compute on the GPU")
    _add_seed(coeff)
    _add_planning_flags(coeff)
    coeff.set_defaults(run=_coefficients)
    bake = sub.add_parser("bake", help="write an equivalent stock mergekit recipe with the lambdas as weights")
    bake.add_argument("recipe", metavar="RECIPE.yml", help="a mergekit recipe (merge_method metagpt, metagpt_ties, metagpt_dare or metagpt_dare_ties)")
    bake.add_argument("output", metavar="OUT.yml", help="the stock recipe to write")
    bake.add_argument("--cuda", action="store_true", help="compute on the GPU")
    _add_planning_flags(bake)
    bake.set_defaults(run=_bake)
    inspect = sub.add_parser(
        "inspect",
        help="without merging: lambda, cosine similarity of the task vectors, ||delta||^2 per layer; "
             "writes a report, JSON and pictures to OUT_DIR",
    )
    inspect.add_argument("recipe", metavar="RECIPE.yml", help="a mergekit recipe (merge_method metagpt, metagpt_ties, metagpt_dare or metagpt_dare_ties)")
    inspect.add_argument("out_dir", metavar="OUT_DIR", help="folder for the report, JSON and pictures")
    inspect.add_argument("--json", action="store_true", help="print the numbers as JSON (also written to OUT_DIR)")
    inspect.add_argument("--cuda", action="store_true", help="compute on the GPU")
    inspect.add_argument("--no-pictures", action="store_true", help="report and JSON only")
    _add_seed(inspect)
    _add_planning_flags(inspect)
    inspect.set_defaults(run=_inspect)
    demo = sub.add_parser("demo-models", help="write a small local base + math/code/chat family")
    demo.add_argument("directory", metavar="DIRECTORY", help="where to write base/, math/, code/ and chat/")
    demo.add_argument("--size", default="tiny", choices=["tiny", "10m", "100m", "1b"],
                      help="parameters per model (default tiny; 1b writes about 4 x 2 GB in bfloat16)")
    demo.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                      help="dtype of the weights written (default bfloat16)")
    demo.set_defaults(run=_demo_models)
    return parser


class _WarningLines(logging.Formatter):
    """This plugin's warnings as the command's other lines read (``mergekit-metagpt: warning:
    …``, beside ``mergekit-metagpt: error: …``); other loggers' records (mergekit's, …) as
    ``logging.basicConfig`` writes them, which mergekit's options would set up."""

    def format(self, record):
        if record.name.split(".")[0] != "mergekit_metagpt":
            return super().format(record)
        text = f"mergekit-metagpt: {record.levelname.lower()}: {record.getMessage()}"
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def _log_lines() -> None:
    """The console handler the command's logging goes to, where nothing has set one up (the
    console script: mergekit's own ``basicConfig``, run when its options are made, then
    leaves it as it is). A program that set up its logging and calls ``main()`` keeps it."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(_WarningLines(logging.BASIC_FORMAT))
    root.addHandler(handler)


def main(argv: Optional[List[str]] = None) -> int:
    _stdout_writes_anything()
    try:
        args = build_parser().parse_args(argv)  # --version, --help: printed here
    except BrokenPipeError:  # `mergekit-metagpt --version | true`
        return _stdout_gone()
    _log_lines()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("mergekit-metagpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mergekit-metagpt coefficients r.yml --json | head`
        return _stdout_gone()
    except ModuleNotFoundError as error:
        if error.name != "mergekit":  # a mergekit that lacks a module: as any other error
            return _report(error)
        print(f"mergekit-metagpt: error: mergekit is not installed in this Python ({sys.executable}): "
              "pip install mergekit==0.1.5", file=sys.stderr)
        return 1
    except Exception as error:  # every error is one line; mergekit's and pydantic's too
        return _report(error)


def _stdout_gone() -> int:
    """Exit status 1 where the reader of stdout went away (a pipe into `head`), with no
    traceback: Python's flush of stdout at exit would print one, so stdout is pointed at
    the null device first."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 1


def _stdout_writes_anything() -> None:
    """What the commands print has λ, δ and ‖ in it. Where stdout's encoding lacks them
    (PYTHONIOENCODING=ascii, a legacy console), they are written as \\u escapes, as Python
    writes them to stderr, rather than failing the command after its work is done."""
    stream = sys.stdout
    try:
        "λδ‖".encode(stream.encoding)
        return
    except (UnicodeEncodeError, LookupError, AttributeError, TypeError):
        pass
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        try:
            stream.reconfigure(errors="backslashreplace")
        except Exception:  # a stream that looks like a TextIOWrapper but is not one: as it is
            pass


def _report(error: BaseException) -> int:
    """One line on stderr (the traceback first with MERGEKIT_METAGPT_DEBUG=1); exit status 1.
    Called while `error` is being handled."""
    from mergekit_metagpt.env import DEBUG_SWITCH, switched_on
    from mergekit_metagpt.errors import one_line, reported_as_bug

    if switched_on(DEBUG_SWITCH):
        import traceback

        traceback.print_exc()
    hint = f" (not an input error: {DEBUG_SWITCH}=1 prints the traceback)" if reported_as_bug(error) else ""
    print(f"mergekit-metagpt: error: {one_line(error)}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
