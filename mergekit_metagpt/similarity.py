"""What the pre-pass tells about a model set besides λ: how aligned the task vectors are
(cosine similarities, whole model and per layer), where each fine-tune changed the
weights (‖δ‖² per layer) and which tensors it changed most.

MetaGPT's closed form assumes the task vectors are close to orthogonal. A cosine of
``COSINE_WARNING`` or more between two models' task vectors (whole model) gets a
warning in the merge's log: their cross term ⟨δ_a, δ_b⟩ is then at least that fraction
of √(‖δ_a‖²‖δ_b‖²), which the closed form takes as zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from mergekit_metagpt.coefficients import text_table

#: |cosine| from which a pair of task vectors is called far from orthogonal (warned).
COSINE_WARNING = 0.3
#: |cosine| under which a pair is called close to orthogonal.
COSINE_ORTHOGONAL = 0.1


def cosine_text(value: Optional[float]) -> str:
    """A whole-model cosine as the tables and the picture show it: "–" where not computed."""
    if value is None:
        return "–"
    text = f"{value:+.4f}"
    return "+0.0000" if text == "-0.0000" else text  # as 0.0 reads: no -0.0000


EMBED, HEAD, OTHER = "embed", "head", "other"
# the leftmost block number: T5's "encoder.block.3.layer.1." is block 3
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_EMBED = re.compile(r"embed_tokens|embed_in|wte|wpe|word_embeddings|tok_embeddings|embeddings\.|(?:^|\.)shared\.")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)\.")


def layer_of(name: str) -> str:
    """The heatmap column of a tensor: its transformer block's number, ``embed``,
    ``head`` or ``other`` (final norm and the rest)."""
    match = _LAYER.search(name)
    if match:
        return match.group(1)
    if _EMBED.search(name):
        return EMBED
    if _HEAD.search(name):
        return HEAD
    return OTHER


def _stack_label(stack: str) -> str:
    """A short name for a stack of blocks: its path without the container and ``model``
    parts ("model.vision_tower.encoder.layers" -> "vision_tower.encoder")."""
    parts = [p for p in stack.split(".")[:-1] if p not in ("model", "transformer")]
    return ".".join(parts) or stack


def block_stacks(names: Sequence[str]) -> List[str]:
    """The stacks of blocks these tensors belong to, by their short names, in order of first
    appearance ("encoder", "decoder"; "vision_tower.encoder")."""
    stacks = list(dict.fromkeys(name[:m.start(1) - 1] for name in names if (m := _LAYER.search(name))))
    return [_stack_label(stack) for stack in stacks]


def where_sets_are(name_lists: Sequence[Sequence[str]]) -> List[str]:
    """For each model set (its output tensors' names), which stacks of blocks it holds
    ("blocks of decoder"), where the sets differ in that (a `modules:` recipe with a set per
    module); empty strings where they do not (a frankenmerge's slices of one stack)."""
    stacks = [block_stacks(names) for names in name_lists]
    if len({tuple(s) for s in stacks}) < 2:
        return ["" for _ in stacks]
    return [f"blocks of {', '.join(s)}" if s else "no blocks" for s in stacks]


def layer_columns(names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Each tensor's column and the columns in order: ``embed``, the blocks, ``other``,
    ``head``. A model with several stacks of blocks (a vision tower beside a language
    model, an encoder and a decoder) gets a column per block of each stack, named by the
    stack ("vision_tower.encoder 3"), in the order the stacks first appear; one stack,
    just the block numbers."""
    keys: List[object] = []
    for name in names:
        match = _LAYER.search(name)
        keys.append((name[:match.start(1) - 1], int(match.group(1))) if match else layer_of(name))
    stacks = list(dict.fromkeys(k[0] for k in keys if isinstance(k, tuple)))
    labels = {s: _stack_label(s) for s in stacks}
    if len(set(labels.values())) < len(stacks):
        labels = {s: s for s in stacks}

    def label(key) -> str:
        if not isinstance(key, tuple):
            return key
        return str(key[1]) if len(stacks) == 1 else f"{labels[key[0]]} {key[1]}"

    columns = [label(k) for k in keys]
    blocks = [label((s, n)) for s in stacks for n in sorted({k[1] for k in keys if isinstance(k, tuple) and k[0] == s})]
    order = ([EMBED] if EMBED in columns else []) + blocks + [x for x in (OTHER, HEAD) if x in columns]
    return columns, order


def _label(name: str, depth: int) -> str:
    """The last `depth` path parts of each side of ``base+lora``, each with its ``@revision``."""
    sides = []
    for side in name.split("+"):
        path, at, revision = side.partition("@")  # a revision may hold "/" (refs/pr/1)
        parts = [p for p in re.split(r"[\\/]", path) if p not in ("", ".")] or [path]
        sides.append("/".join(parts[-depth:]) + at + revision)
    return "+".join(sides)


def _depth(name: str) -> int:
    """How many path parts the longest side of ``base+lora`` has."""
    return max(len([p for p in re.split(r"[\\/]", side.partition("@")[0]) if p not in ("", ".")]) or 1
               for side in name.split("+"))


def short_names(models: Sequence[Hashable]) -> List[str]:
    """Readable labels: each model's folder name (with its ``@revision`` and ``+adapter``),
    or where two clash the shortest ending of their paths that tells them apart
    (``a/model``, ``b/model``); the full name if none does."""
    full = [str(m) for m in models]
    most = [_depth(n) for n in full]
    depth = [1] * len(full)
    while True:
        names = [_label(n, d) for n, d in zip(full, depth)]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < most[i]]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    return [n if names.count(n) == 1 else str(m) for n, m in zip(names, models)]


@dataclass
class SetStats:
    """One model set's task-vector statistics."""

    models: List[str]
    squared_norms: List[float]
    lambdas: List[float]
    #: [a][b]: whole-model cosine, None where not computed (see `note`)
    cosine: List[List[Optional[float]]]
    layers: List[str]
    layer_norms: List[List[float]]  # [model][layer]: Σ ‖δ‖² over the layer's tensors
    layer_cosine: Dict[Tuple[int, int], List[Optional[float]]]  # (a, b) -> per layer
    top_tensors: List[List[Tuple[str, float]]]  # per model: (tensor, ‖δ‖²), largest first
    note: Optional[str] = None  # why some cosines are missing
    alpha: float = 1.0  # the tempering exponent of `lambdas`
    #: (a, b), a before b: pairs whose inner product was not computed (see `note`)
    missing_pairs: List[Tuple[int, int]] = field(default_factory=list)

    def pairs(self):
        """((a, b), cosine) for every pair of models, a before b."""
        n = len(self.models)
        return [((a, b), self.cosine[a][b]) for a in range(n) for b in range(a + 1, n)]

    @property
    def computed(self) -> bool:
        """Whether some pair's cosine was computed (else no table of dashes is shown)."""
        return any(c is not None for _, c in self.pairs())

    @property
    def largest_cosine(self) -> Optional[Tuple[Tuple[int, int], float]]:
        known = [(ab, c) for ab, c in self.pairs() if c is not None]
        return max(known, key=lambda item: abs(item[1])) if known else None

    def far_pairs(self, threshold: float = COSINE_WARNING):
        return [(ab, c) for ab, c in self.pairs() if c is not None and abs(c) >= threshold]

    def verdict(self) -> str:
        """Plain language: do the task vectors look orthogonal, as MetaGPT's λ assume? Where
        some pairs were not computed, it says which, and speaks only of the others."""
        if len(self.models) < 2:
            return "One model: no pair of task vectors to compare."
        largest = self.largest_cosine
        if largest is None:
            return "Cosine similarities not available" + (f": {self.note}." if self.note else ".")
        if not self.missing_pairs:
            return self._verdict_of_known(largest)
        unknown = self._missing_names()
        of_known = self._verdict_of_known(largest)
        return (f"Not computed for {len(self.missing_pairs)} of {len(self.pairs())} pairs ({unknown}): "
                "nothing is known of their alignment, and no warning can be given for them "
                "(`mergekit-metagpt inspect` computes every pair). Of the pairs computed: "
                + (of_known[0].lower() + of_known[1:] if of_known.startswith(("Close", "Mostly")) else of_known))

    def _missing_names(self) -> str:
        names = short_names(self.models)
        return ", ".join(f"{names[a]} and {names[b]}" for a, b in self.missing_pairs)

    def missing_text(self) -> str:
        """One line for the log: which pairs were not computed, why it matters, what computes them."""
        unknown = self._missing_names()
        return (f"cosine similarities not computed for {len(self.missing_pairs)} of {len(self.pairs())} "
                f"pairs ({unknown}): their models' norms came from the norm cache, which held no inner "
                "product for them, and a merge reads no tensor for a product alone, so an aligned pair "
                "among them would go unwarned; `mergekit-metagpt inspect RECIPE.yml DIR` computes them "
                "(later merges take them from the cache)")

    def _verdict_of_known(self, largest) -> str:
        names = short_names(self.models)
        far = self.far_pairs()
        if far:
            parts = [f"{names[a]} and {names[b]} task vectors have cosine {c:.2f}" for (a, b), c in far]
            return (
                "; ".join(parts) + f": far from orthogonal (|cosine| >= {COSINE_WARNING}). "
                "MetaGPT's λ assume ~0: its closed form drops the cross terms ⟨δ_a, δ_b⟩, so "
                "for these models the λ are not the optimum the paper derives."
            )
        (a, b), c = largest
        if abs(c) < COSINE_ORTHOGONAL:
            return (f"Close to orthogonal: the largest |cosine| is {abs(c):.2g} ({names[a]} and "
                    f"{names[b]}), as MetaGPT's λ assume.")
        return (f"Mostly orthogonal: the largest |cosine| is {abs(c):.2f} ({names[a]} and {names[b]}), "
                f"under the warning threshold {COSINE_WARNING}; MetaGPT's λ assume ~0.")

    def cosine_table(self) -> str:
        names = short_names(self.models)
        rows = [[names[a]] + [cosine_text(v) for v in row] for a, row in enumerate(self.cosine)]
        return text_table(["cosine"] + names, rows)

    def to_json(self) -> dict:
        names = [str(m) for m in self.models]
        return {
            "models": names,
            "squared_norms": self.squared_norms,
            "lambdas": self.lambdas,
            "alpha": self.alpha,
            "cosine": self.cosine,
            "cosine_note": self.note,
            "verdict": self.verdict(),
            "layers": self.layers,
            "layer_squared_norms": self.layer_norms,
            "layer_cosine": {f"{names[a]} | {names[b]}": v for (a, b), v in self.layer_cosine.items()},
            "top_tensors": {names[i]: [{"tensor": t, "squared_norm": v} for t, v in top]
                            for i, top in enumerate(self.top_tensors)},
        }


def _cosine(products, norms_a, norms_b) -> Tuple[Optional[float], bool]:
    """(cosine over the tasks whose product counts, whether a product is missing)."""
    from mergekit_metagpt.set_norms import MISSING

    dot = sa = sb = 0.0
    counted = False
    for p, na, nb in zip(products, norms_a, norms_b):
        if p is MISSING:
            return None, True
        if p is None:
            continue
        counted = True
        dot, sa, sb = dot + p, sa + (na or 0.0), sb + (nb or 0.0)
    if not counted or sa <= 0.0 or sb <= 0.0:
        return None, False
    cosine = dot / math.sqrt(sa * sb)
    if not math.isfinite(cosine):  # min/max below would make NaN +1
        return None, False
    return max(-1.0, min(1.0, cosine)), False


def set_stats(set_norms, top: int = 5) -> SetStats:
    """The statistics of one model set (a set_norms.SetNorms)."""
    merge_set = set_norms.merge_set
    models = list(merge_set.models)
    names = [t.output_weight.name for t in merge_set.tasks]
    columns, layers = layer_columns(names)
    coefficients = set_norms.coefficients
    lambdas = coefficients.lambdas
    per_task = {m: [v or 0.0 for v in set_norms.per_task[m]] for m in models}
    n = len(models)
    cosine: List[List[Optional[float]]] = [[1.0 if a == b else None for b in range(n)] for a in range(n)]
    layer_cosine: Dict[Tuple[int, int], List[Optional[float]]] = {}
    missing = False
    missing_pairs: List[Tuple[int, int]] = []
    for a in range(n):
        for b in range(a + 1, n):
            products = set_norms.per_pair.get((models[a], models[b]))
            if products is None:
                continue
            value, gap = _cosine(products, per_task[models[a]], per_task[models[b]])
            missing |= gap
            if gap:
                missing_pairs.append((a, b))
            cosine[a][b] = cosine[b][a] = value
            by_layer = []
            for layer in layers:
                idx = [k for k, c in enumerate(columns) if c == layer]
                by_layer.append(_cosine([products[k] for k in idx], [per_task[models[a]][k] for k in idx],
                                        [per_task[models[b]][k] for k in idx])[0])
            layer_cosine[(a, b)] = by_layer
    for a in range(n):  # a zero task vector has no direction
        if coefficients.squared_norms[a][1] == 0.0:
            cosine[a][a] = None
    layer_norms = [[sum(v for v, c in zip(per_task[m], columns) if c == layer) for layer in layers] for m in models]
    top_tensors = [sorted(zip(names, per_task[m]), key=lambda item: -item[1])[:top] for m in models]
    note = None
    if set_norms.sparse:
        note = "not computed where λ come from sparsified task vectors (lambda_from: sparse)"
    elif missing:
        note = ("not computed: MERGEKIT_METAGPT_COSINES=0, or norms from the norm cache, which held "
                "no inner product for some pairs (a cache written before inner products existed, or "
                "models merged together for the first time); a merge reads no tensor for them: "
                "`mergekit-metagpt inspect` computes them")
    elif coefficients.all_zero:
        note = "every task vector is zero"
    return SetStats(
        models=models,
        squared_norms=[v for _, v in coefficients.squared_norms],
        lambdas=[lambdas[m] for m in models],
        cosine=cosine,
        layers=layers,
        layer_norms=layer_norms,
        layer_cosine=layer_cosine,
        top_tensors=top_tensors,
        note=note,
        alpha=coefficients.alpha,
        missing_pairs=missing_pairs,
    )
