"""``mergekit-metagpt inspect``: the pre-pass's statistics of a recipe, as a report, JSON
and pictures, without merging.

Writes into OUT_DIR: ``metagpt-report.md`` (λ, cosine matrix and verdict, ‖δ‖² per layer,
the largest-changed tensors, per-layer cosines), ``metagpt-inspect.json`` (the same
numbers) and, with matplotlib (``pip install matplotlib``, the ``plots`` extra), the PNGs of
``plots``. OUT_DIR may be the merge's output folder: the model card then links the
pictures (when they are of the same models and norms).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import List

from mergekit_metagpt.coefficients import formula, text_table
from mergekit_metagpt.errors import MetaGPTError
from mergekit_metagpt.markdown import line, table

LOG = logging.getLogger("mergekit_metagpt")

REPORT_NAME = "metagpt-report.md"
JSON_NAME = "metagpt-inspect.json"
#: (file stem, title) of each picture, per model set
PICTURES = (
    ("metagpt-layer-norms", "‖δ‖² per layer"),
    ("metagpt-lambdas", "λ per model"),
    ("metagpt-cosines", "cosine matrix"),
)
PLOTS_HINT = "pictures need matplotlib: pip install matplotlib"


def payload(run, recipe_path: str) -> dict:
    from mergekit_metagpt import __version__
    from mergekit_metagpt.code_digest import code_digest

    from mergekit_metagpt.record import passed_through_entries, run_dtypes, set_parameters

    merges = []
    for set_norms in run.result.merging:
        entry = {"base_model": str(set_norms.merge_set.base), "tensors": len(set_norms.merge_set.tasks)}
        entry.update(set_parameters(set_norms))
        entry.update(set_norms.stats.to_json())
        merges.append(entry)
    dtype, out_dtype = run_dtypes(run)
    return {
        "format": 1,
        "recipe": os.path.basename(recipe_path),  # its folder may be the user's home: written to be shared
        "random_seed": getattr(run.options, "random_seed", None),
        "merge_method": run.method_name,
        "plugin_version": __version__,
        "plugin_code_sha256": code_digest(),
        "dtype": dtype,  # the recipe's (the norms are of the tensors cast to it)
        "out_dtype": out_dtype,
        "norms": norms_text(),
        "merges": merges,
        "passed_through": passed_through_entries(run.result),
    }


def norms_text() -> str:
    """How the norms and inner products are summed (``norms.task_vector_sums``), for the JSON."""
    from mergekit_metagpt.norms import GRAM_BLOCK
    from mergekit_metagpt.scratch import CHUNK, CPU_CHUNK

    return (
        f"float32 sums (float64 where the model's or the base's tensor is float64) per block of "
        f"{GRAM_BLOCK} elements, added in "
        f"float64 per chunk and across chunks in order; chunks of "
        f"{CPU_CHUNK} elements ({_mib(CPU_CHUNK)} of float32) on CPU, {CHUNK} ({_mib(CHUNK)}) on a GPU; "
        f"norms: every task vector's summed alike on a device, dense or sparsified, alone or read "
        f"beside others; "
        f"inner products: on CPU, where float32 matrix products are exact, from each block's Gram "
        f"matrix, otherwise elementwise products summed per chunk"
    )


def _mib(elements: int) -> str:
    return f"{elements * 4 / 2**20:g} MiB"


def _suffix(number: int, count: int) -> str:
    return f"-{number}" if count > 1 else ""


def _per_tensor(set_norms) -> int:
    """How many of the set's tensors are merged with their own λ (granularity: per_tensor)."""
    from mergekit_metagpt.merge_plan import task_parameter

    return sum(1 for t in set_norms.merge_set.tasks if task_parameter(t, "granularity") == "per_tensor")


def set_places(run) -> List[str]:
    """Which stacks of blocks each model set holds, where the sets differ in that."""
    from mergekit_metagpt.similarity import where_sets_are

    return where_sets_are([[t.output_weight.name for t in s.merge_set.tasks] for s in run.result.merging])


def _context(set_norms, number: int, count: int, place: str = "") -> List[str]:
    """What a picture's title must add: which model set, and what its λ are not."""
    lines = []
    if count > 1:
        lines.append(f"model set {number} of {count} ({len(set_norms.merge_set.tasks)} tensors"
                     f"{'; ' + place if place else ''})")
    per_tensor = _per_tensor(set_norms)
    if per_tensor:
        lines.append(f"granularity: per_tensor ({per_tensor} of {len(set_norms.merge_set.tasks)} tensors): "
                     "merged with each tensor's own λ; these are over the whole set")
    return lines


def write(run, recipe_path: str, out_dir: str, pictures: bool = True) -> List[str]:
    """Write the report, JSON and (if matplotlib is there) pictures; returns the paths.

    All or nothing: the files are made in a temporary folder inside `out_dir`, then each
    renamed over an earlier run's, so that a full disk leaves neither a cut-off picture nor
    this run's pictures beside an earlier run's report. An earlier cosine picture the
    report would not name (no pair computed) is removed."""
    from mergekit_metagpt import plots

    os.makedirs(out_dir, exist_ok=True)
    try:
        staging = tempfile.mkdtemp(prefix=".tmp-inspect-", dir=out_dir)
        try:
            names = _write_files(run, recipe_path, staging, pictures)
            for name in names:  # before any is replaced
                target = os.path.join(out_dir, name)
                if os.path.lexists(target) and not os.path.isfile(target):
                    raise MetaGPTError(f"inspect: cannot write {target}: it is not a file (nothing was written "
                                       f"in {out_dir})")
            replaced = []
            try:
                for name in names:
                    os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
                    replaced.append(name)
            except OSError as error:
                raise MetaGPTError(f"inspect: cannot write {os.path.join(out_dir, name)}: "
                                   f"{error.strerror or error} (written before it: {', '.join(replaced) or 'none'})"
                                   ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise MetaGPTError(f"inspect: cannot write the report in {out_dir}: {error.strerror or error}"
                           " (files of an earlier run there are as they were)") from None
    if pictures and plots.available():
        count = len(run.result.merging)
        for number in range(1, count + 1):
            name = f"metagpt-cosines{_suffix(number, count)}.png"
            if name not in names:  # an earlier run's: the card would link it
                try:
                    os.remove(os.path.join(out_dir, name))
                except FileNotFoundError:
                    pass
                except OSError as error:
                    LOG.warning("MetaGPT: could not remove the earlier %s: %s", os.path.join(out_dir, name), error)
    return [os.path.join(out_dir, name) for name in names]


def _write_files(run, recipe_path: str, out_dir: str, pictures: bool) -> List[str]:
    """The files' names, written in `out_dir`."""
    from mergekit_metagpt import plots
    from mergekit_metagpt.atomic_files import write_json

    data = payload(run, recipe_path)
    written = []
    count = len(run.result.merging)
    drawn = pictures and plots.available()
    if drawn:
        for number, (set_norms, place) in enumerate(zip(run.result.merging, set_places(run)), 1):
            written += plots.write_pictures(set_norms.stats, out_dir, _suffix(number, count),
                                            _context(set_norms, number, count, place), sparse=set_norms.sparse)
    path = os.path.join(out_dir, JSON_NAME)
    write_json(path, data, indent=2)
    written.append(path)
    path = os.path.join(out_dir, REPORT_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(report_text(run, recipe_path, drawn, turned_off=not pictures))
    written.append(path)
    return [os.path.basename(p) for p in written]


def one_draw(seed, these: str = "these", code: str = "") -> str:
    """What sparse DARE λ are: a draw of the masks, seeded (as a merge with that seed) or not.
    `code`: the quote marks around commands (a backtick in Markdown)."""
    if seed is None:
        return (f"DARE's masks are random, so {these} are one draw ({code}--random-seed N{code} draws them "
                "as mergekit-yaml's does)")
    return f"DARE's masks are random: drawn as by {code}mergekit-yaml --random-seed {seed}{code}"


def report_text(run, recipe_path: str, drawn: bool, turned_off: bool = False) -> str:
    from mergekit_metagpt.method import RANDOM_DROP
    from mergekit_metagpt.record import passed_through_entries, passed_through_text
    from mergekit_metagpt.similarity import COSINE_WARNING, cosine_text, short_names

    sets = run.result.merging
    sparse = any(s.sparse for s in sets)
    delta = ("δ_t the sparsified θ_t − θ₀ (lambda_from: sparse: ‖δ‖², λ and the layers below are of the "
             "sparsified task vectors" + ("; " + one_draw(getattr(run.options, "random_seed", None), code="`")
                                          if run.method_name in RANDOM_DROP else "") + ")" if sparse
             else "δ_t = θ_t − θ₀")
    lines = [f"# MetaGPT inspection of `{os.path.basename(recipe_path)}`", "",
             f"Merge method `{run.method_name}`; {len(sets)} model set(s). {formula(s.stats.alpha for s in sets)}, "
             f"{delta}, norms over every tensor the merge reads. MetaGPT's λ assume that the "
             f"task vectors are close to orthogonal; a pair with |cosine| >= {COSINE_WARNING} is "
             "called far from it.", ""]
    passed = passed_through_text(passed_through_entries(run.result))
    if passed:
        lines += [passed + ".", ""]
    if not drawn:
        lines += [f"(No pictures: {'--no-pictures' if turned_off else PLOTS_HINT}.)", ""]
    for number, (set_norms, place) in enumerate(zip(sets, set_places(run)), 1):
        stats = set_norms.stats
        names = short_names(stats.models)
        suffix = _suffix(number, len(sets))
        title = f"Model set {number} of {len(sets)}: " if len(sets) > 1 else ""
        lines += [f"## {title}base `{line(set_norms.merge_set.base)}`, {len(set_norms.merge_set.tasks)} tensors"
                  f"{', ' + place if place else ''}", ""]
        lines += ["### Verdict", "", line(stats.verdict()), ""]
        lines += ["### λ", ""]
        per_tensor = _per_tensor(set_norms)
        if per_tensor:
            lines += [f"`granularity: per_tensor` ({per_tensor} of {len(set_norms.merge_set.tasks)} tensors): "
                      "the merge takes each such tensor's own λ (the ‖δ‖² of that tensor alone); the λ here "
                      "are over the whole set, as the merge takes them for its other tensors "
                      "(`mergekit-metagpt coefficients` gives the spread per tensor).", ""]
        lines += table(["model", "‖δ‖²", "λ"], [
            [f"`{m}`", f"{n:.6e}", f"{lam:.6f}"] for m, n, lam in zip(stats.models, stats.squared_norms, stats.lambdas)
        ])
        if drawn:
            lines += ["", f"![λ per model](metagpt-lambdas{suffix}.png)"]
        lines += ["", "### Cosine similarity of the task vectors", ""]
        computed = stats.computed
        if computed or not stats.pairs():
            lines += table(["", *names], [
                [names[a], *(cosine_text(v) for v in row)] for a, row in enumerate(stats.cosine)
            ])
            if stats.note:
                lines += ["", f"Missing values: {stats.note}."]
        elif stats.note:  # none computed: no table of dashes
            lines.append(f"{stats.note[0].upper()}{stats.note[1:]}.")
        if drawn and computed:
            lines += ["", f"![cosine matrix](metagpt-cosines{suffix}.png)"]
        lines += ["", "### Where each fine-tune changed the model (‖δ‖² per layer)", "",
                  "Layers: `embed` (embeddings), the blocks by number (by stack and number where the model has several stacks, e.g. a vision tower), `other` (the final norm and any "
                  "tensor outside the blocks), `head` (`lm_head`).", ""]
        if drawn:
            lines += [f"![‖δ‖² per layer](metagpt-layer-norms{suffix}.png)", ""]
        lines += table(["layer", *names], [
            [layer, *(f"{stats.layer_norms[i][j]:.3e}" for i in range(len(names)))]
            for j, layer in enumerate(stats.layers)
        ])
        lines += ["", "### Largest-changed tensors", ""]
        for i, name in enumerate(names):
            total = stats.squared_norms[i] or 1.0
            lines.append(f"- **{name}**: " + "; ".join(
                f"`{t}` {v:.3e} ({v / total:.1%})" for t, v in stats.top_tensors[i]))
        if any(v is not None for values in stats.layer_cosine.values() for v in values):
            lines += ["", "### Cosine per layer", "",
                      f"The warning at |cosine| >= {COSINE_WARNING} is of the whole model; a layer's "
                      "cosine shows where two task vectors overlap.", ""]
            pairs = sorted(stats.layer_cosine)

            def cell(pair, j):
                value = stats.layer_cosine[pair][j]
                return "–" if value is None else f"{value:+.3f}"

            if len(pairs) > len(stats.layers):  # many models, few layers: a row per pair
                lines += table(["pair", *stats.layers], [
                    [f"{names[a]} / {names[b]}", *(cell((a, b), j) for j in range(len(stats.layers)))]
                    for a, b in pairs
                ])
            else:
                lines += table(["layer", *(f"{names[a]} / {names[b]}" for a, b in pairs)], [
                    [layer, *(cell(p, j) for p in pairs)] for j, layer in enumerate(stats.layers)
                ])
        lines.append("")
    return "\n".join(lines)


def summary_text(run, written: List[str], drawn: bool) -> str:
    """What the command prints: per set, λ and cosine tables and the verdict."""
    from mergekit_metagpt.record import passed_through_entries, passed_through_text

    blocks = []
    for set_norms in run.result.merging:
        stats = set_norms.stats
        blocks.append("\n".join([
            f"base {set_norms.merge_set.base}",
            text_table(["model", "||delta||^2", "lambda"], [
                [str(m), f"{n:.6e}", f"{lam:.6f}"] for m, n, lam in zip(stats.models, stats.squared_norms, stats.lambdas)
            ]),
            "",
            *([stats.cosine_table()] if stats.computed else []),  # no table of blanks
            stats.verdict(),
        ]))
    tail = ["", "wrote " + ", ".join(written)]
    passed = passed_through_text(passed_through_entries(run.result))
    if passed:
        tail.insert(0, passed)
    if not drawn:
        tail.append(PLOTS_HINT)
    return "\n\n".join(blocks) + "\n" + "\n".join(tail)
