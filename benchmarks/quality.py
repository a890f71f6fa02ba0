"""Merge quality on real text: which method keeps most of each fine-tune's gain?

    python benchmarks/quality.py [--quick] [--seeds 0,1,2] [--jobs 2] [--work DIR] [--base-domains code,licenses,docs]
                                 [--only 'LABEL;LABEL']

Offline, from files any Debian machine with Python has. A byte-level LLaMA-shaped causal LM
(~0.86M parameters, transformers) is trained as the base on equal shares of two of three
domains (code and docs, ~98 KB each: the size of the smallest domain), then one copy is
fine-tuned on each domain alone, with different steps and learning rates so that the task
vectors' norms differ several-fold, as real fine-tunes' do. The third domain (licenses) is new
to the base, as a fine-tune's task often is; `--base-domains code,licenses,docs` trains the base
on all three instead, and the license fine-tune then gains so little (~0.05 bits/byte, against
~0.9 here) that its kept share, divided by that gain, is mostly seed noise:

- code:     the top-level modules of Python's standard library, docstrings blanked out
            (the first 3 MB, in file-name order);
- licenses: the license texts under /usr/share/common-licenses, each family once, at its
            latest version (GPL-2 and GPL-3 share much of their text);
- docs:     the docstrings of the same modules (module, class and function), via ast.

Every merge runs through stock ``mergekit-yaml`` in its own process (the variants as stock
``task_arithmetic`` recipes with the weights they compute from the task vectors). Each model is
scored per domain by its loss on held-out text of that domain (every tenth 2 KiB block, in no
training text), as the share of the domain's fine-tune gain it keeps:

    kept_d = (loss_base,d - loss_merge,d) / (loss_base,d - loss_finetune_d,d)

1 is as good as that domain's own fine-tune, 0 no better than the base, below 0 worse than the
base. Two scores per row, each averaged over the seeds with its standard deviation across seeds:
"mean kept", the mean of kept_d over the domains (each domain an equal share, however small its
fine-tune's gain), and "overall kept", the share of the fine-tunes' summed gain:

    overall = sum_d (loss_base,d - loss_merge,d) / sum_d (loss_base,d - loss_finetune_d,d)

i.e. MetaGPT's own objective (the mean loss gap between the merge and each fine-tune on its
task), normalised. The base is trained once; each seed fine-tunes its own copies (data
order) and seeds mergekit's random methods (--random-seed). Trained models are kept in --work,
keyed by the settings and the data, and reused by later runs.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ = 128
BLOCK = 2048  # held-out split: every tenth block of each domain
# bump when the data, the split or the training changes: trained models are cached by it
FORMAT = 2
DOMAINS = ("code", "licenses", "docs")


# -- data ---------------------------------------------------------------------------
def _stdlib_files() -> List[str]:
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        sys.exit(f"quality: no Python standard library sources under {root}")
    return files


_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _split_source(path: str) -> Tuple[str, List[str]]:
    """A stdlib module's source with its docstrings blanked out, and the docstrings."""
    with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source, []
    lines, docs = source.split("\n"), []
    for node in ast.walk(tree):
        body = getattr(node, "body", None) if isinstance(node, _DOC_OWNERS) else None
        first = body[0] if body else None
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
                docs.append(doc)
            for i in range(first.lineno - 1, first.end_lineno):
                lines[i] = ""
    return "\n".join(lines), docs


def _code_and_docs() -> Tuple[str, str]:
    """Code without docstrings, and the docstrings: two domains with no text in common."""
    code, docs = [], []
    for path in _stdlib_files():
        text, found = _split_source(path)
        code.append(text)
        docs.extend(found)
    return "\n".join(code), "\n\n".join(docs)


def _licenses_text() -> str:
    """Each license family once, at its latest version: several names there are symlinks
    to one file, and GPL-2 / GPL-3 (LGPL, GFDL, MPL) share much of their text, which would
    put held-out text into the training text."""
    root = "/usr/share/common-licenses"
    latest: Dict[str, str] = {}
    for path in sorted({os.path.realpath(p) for p in glob.glob(os.path.join(root, "*"))
                        if os.path.isfile(p)}, key=_version_order):
        latest[os.path.basename(path).split("-")[0]] = path
    files = sorted(latest.values())
    if not files:
        sys.exit(f"quality: no license texts under {root} (Debian's base-files package)")
    parts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def _version_order(path: str):
    name = os.path.basename(path)
    family, _, version = name.partition("-")
    return family, [int(x) if x.isdigit() else 0 for x in version.split(".")]


def data_digest(domains) -> str:
    """A hash of every domain's bytes (the trained models depend on them)."""
    h = hashlib.sha256()
    for name in DOMAINS:
        h.update(name.encode())
        h.update(domains[name].train.to(torch.uint8).numpy().tobytes())
        h.update(domains[name].held_out.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Domain:
    name: str
    train: torch.Tensor  # uint8 bytes
    held_out: torch.Tensor


def load_domains(max_bytes: int) -> Dict[str, Domain]:
    code, docs = _code_and_docs()
    texts = {"code": code, "licenses": _licenses_text(), "docs": docs}
    domains = {}
    for name in DOMAINS:
        data = texts[name].encode("utf-8")[:max_bytes]
        blocks = [data[i: i + BLOCK] for i in range(0, len(data), BLOCK)]
        train = b"".join(b for i, b in enumerate(blocks) if i % 10 != 5)
        held = b"".join(b for i, b in enumerate(blocks) if i % 10 == 5)
        domains[name] = Domain(
            name,
            torch.frombuffer(bytearray(train), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(held), dtype=torch.uint8).long(),
        )
    return domains


# -- models ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    hidden: int = 128
    layers: int = 4
    intermediate: int = 344
    batch: int = 16
    base_steps: int = 800
    base_lr: float = 3e-3
    # per domain: (steps, learning rate); different distances travelled from the base
    finetune: Tuple[Tuple[str, int, float], ...] = (
        ("code", 200, 3e-4),
        ("licenses", 100, 1.5e-4),
        ("docs", 60, 9e-5),
    )
    max_bytes: int = 3_000_000
    eval_windows: int = 64
    eval_len: int = 256
    # the domains the base is trained on, each with as many bytes as the smallest of all the
    # domains has; a domain left out is new to the base and its fine-tune learns it from
    # scratch. By default the base has not seen the licenses: a base that has (all three)
    # fits their 98 KB so well that the license fine-tune gains ~0.05 bits/byte, and that
    # domain's kept share (divided by the gain) is mostly seed noise
    base_domains: Tuple[str, ...] = ("code", "docs")

    def key(self, part: str, data: str) -> str:
        """A short hash of what decides the base ("base") or the fine-tunes ("finetunes"):
        these settings, the data's digest, the code's FORMAT and Python's version (its
        standard library is the data)."""
        names = ("hidden", "layers", "intermediate", "batch", "base_steps", "base_lr", "max_bytes")
        values = {k: v for k, v in asdict(self).items() if k in names}
        values.update(format=FORMAT, data=data, python=sys.version_info[:2], seq=SEQ, block=BLOCK)
        if self.base_domains != DOMAINS:  # (a base of all three keeps its earlier key)
            values["base_domains"] = list(self.base_domains)
            values["base_share"] = "smallest of all domains"
        if part != "base":
            values["finetune"] = self.finetune
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


QUICK = Settings(base_steps=300, finetune=(("code", 100, 3e-4), ("licenses", 50, 1.5e-4),
                                           ("docs", 30, 9e-5)), eval_windows=32)


def _config(s: Settings):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="float32",
    )


def _batches(data: torch.Tensor, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=gen)
        yield torch.stack([data[s: s + SEQ] for s in starts.tolist()])


def _train(model, data: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
           warmup: int = 0, decay: bool = False):
    """AdamW on random windows; optional linear warm-up and cosine decay to lr / 10."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    it = _batches(data, batch, gen)
    for step in range(steps):
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if decay:
            factor *= 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        x = next(it)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def _save(model, path: str, about: dict) -> None:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "quality-settings.json"), "w") as f:
        json.dump(about, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def ensure_base(work: str, s: Settings, domains: Dict[str, Domain], data: str) -> str:
    """The pre-trained base: an equal share of each of ``s.base_domains``, as many bytes as
    the smallest of all the domains has, so that which domains are chosen does not change how
    much of each the base sees (trained once, then reused); ``data`` is the domains' digest."""
    from transformers import LlamaForCausalLM

    path = os.path.join(work, f"base-{s.key('base', data)}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    t0 = time.time()
    torch.manual_seed(1000)
    model = LlamaForCausalLM(_config(s))
    share = min(len(domains[d].train) for d in DOMAINS)
    mix = torch.cat([domains[d].train[:share] for d in s.base_domains])
    loss = _train(model, mix, s.base_steps, s.base_lr, s.batch, 0, warmup=50, decay=True)
    _save(model, path, {"settings": asdict(s), "format": FORMAT, "data": data})
    print(f"  base trained ({s.base_steps} steps, loss {loss:.3f}, {time.time() - t0:.0f} s)",
          flush=True)
    return path


def ensure_finetunes(work: str, s: Settings, seed: int, domains: Dict[str, Domain],
                     data: str) -> Dict[str, str]:
    """One fine-tune of the base per domain for this seed (data order from the seed)."""
    from transformers import LlamaForCausalLM

    base = ensure_base(work, s, domains, data)
    root = os.path.join(work, f"finetunes-{s.key('finetunes', data)}", f"seed{seed}")
    paths = {d: os.path.join(root, f"ft-{d}") for d, _, _ in s.finetune}
    for i, (domain, steps, lr) in enumerate(s.finetune):
        if os.path.exists(os.path.join(paths[domain], "config.json")):
            continue
        t0 = time.time()
        model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        loss = _train(model, domains[domain].train, steps, lr, s.batch, 1 + seed * 100 + i)
        _save(model, paths[domain], {"settings": asdict(s), "format": FORMAT, "seed": seed,
                                     "data": data, "base": base})
        print(f"  seed {seed}: fine-tune {domain} ({steps} steps at lr {lr:g}, loss {loss:.3f}, "
              f"{time.time() - t0:.0f} s)", flush=True)
    return {"base": base, **paths}


# -- evaluation -----------------------------------------------------------------------
def eval_windows(domains: Dict[str, Domain], s: Settings) -> Dict[str, torch.Tensor]:
    out = {}
    for name, d in domains.items():
        n = len(d.held_out) - s.eval_len
        starts = torch.linspace(0, n - 1, s.eval_windows).long().tolist()
        out[name] = torch.stack([d.held_out[i: i + s.eval_len] for i in starts])
    return out


@torch.no_grad()
def held_out_loss(model, windows: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Mean next-byte cross-entropy per domain, in bits per byte."""
    losses = {}
    for name, x in windows.items():
        total, count = 0.0, 0
        for chunk in x.split(32):
            logits = model(input_ids=chunk).logits[:, :-1].float()
            target = chunk[:, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(ce)
            count += target.numel()
        losses[name] = total / count / math.log(2)
    return losses


def load_model(path: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


# -- merges ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    label: str
    merge_method: str
    parameters: Tuple[Tuple[str, object], ...] = ()  # the recipe's global parameters
    model_parameters: Tuple[Tuple[str, object], ...] = ()  # every model's parameters
    group: str = "stock"  # "paper", "variant" or "stock"
    with_base: bool = True  # linear averages the fine-tunes alone (no base_model)
    # per domain, the model's weight: a number, or mergekit's list of {filter, value}
    weights: Tuple[Tuple[str, object], ...] = ()

    def recipe(self, models: Dict[str, str]) -> dict:
        recipe = {
            "merge_method": self.merge_method,
            **({"base_model": models["base"]} if self.with_base else {}),
            "dtype": "float32",
            "models": [{"model": models[d]} for d in DOMAINS],
        }
        weights = dict(self.weights)
        for entry, d in zip(recipe["models"], DOMAINS):
            params = dict(self.model_parameters)
            if d in weights:
                params["weight"] = weights[d]
            if params:
                entry["parameters"] = params
        if self.parameters:
            recipe["parameters"] = dict(self.parameters)
        return recipe


DENSITY = 0.55
METHODS: Tuple[Method, ...] = (
    Method("metagpt", "metagpt", group="paper"),
    Method("metagpt_ties (density 0.55)", "metagpt_ties", (), (("density", DENSITY),), "paper"),
    Method("metagpt_dare (density 0.55)", "metagpt_dare", (), (("density", DENSITY),), "paper"),
    Method("metagpt_dare_ties (density 0.55)", "metagpt_dare_ties", (), (("density", DENSITY),), "paper"),
    Method("metagpt_ties (density 0.55, lambda_from: sparse)", "metagpt_ties",
           (("lambda_from", "sparse"),), (("density", DENSITY),), "paper"),
    Method("metagpt, granularity: per_tensor", "metagpt", (("granularity", "per_tensor"),),
           group="paper"),
    Method("metagpt, alpha: 0.5 (tempered, lambda ~ ||delta||)", "metagpt", (("alpha", 0.5),),
           group="variant"),
    Method("linear (weight average)", "linear", (), (("weight", 1.0),), with_base=False),
    Method("task_arithmetic, weight 0.3", "task_arithmetic", (), (("weight", 0.3),)),
    Method("task_arithmetic, weight 0.5", "task_arithmetic", (), (("weight", 0.5),)),
    Method("task_arithmetic, weight 0.7", "task_arithmetic", (), (("weight", 0.7),)),
    Method("task_arithmetic, weight 1.0", "task_arithmetic", (), (("weight", 1.0),)),
    Method("ties (density 0.55, normalize)", "ties", (("normalize", True),),
           (("weight", 1.0), ("density", DENSITY))),
    Method("dare_linear (density 0.55, normalize)", "dare_linear", (("normalize", True),),
           (("weight", 1.0), ("density", DENSITY))),
    Method("dare_ties (density 0.55, normalize)", "dare_ties", (("normalize", True),),
           (("weight", 1.0), ("density", DENSITY))),
    Method("sce", "sce"),
)
AVERAGE = "linear (weight average)"
TA_GRID = tuple(m.label for m in METHODS if m.merge_method == "task_arithmetic")


def _mergekit_yaml() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    found = local if os.path.exists(local) else shutil.which("mergekit-yaml")
    if not found:
        sys.exit("quality: mergekit-yaml not found (pip install the package first)")
    return found


def run_merge(method: Method, models: Dict[str, str], out_root: str, seed: int,
              threads: int) -> Tuple[str, float]:
    """One merge through stock mergekit-yaml in its own process; returns (output, seconds)."""
    import yaml

    slug = "".join(c if c.isalnum() else "-" for c in method.label).strip("-")
    recipe, out = os.path.join(out_root, slug + ".yml"), os.path.join(out_root, slug)
    with open(recipe, "w") as f:
        yaml.safe_dump(method.recipe(models), f, sort_keys=False)
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MERGEKIT_METAGPT_PROGRESS="0")
    t0 = time.time()
    proc = subprocess.run(
        [_mergekit_yaml(), recipe, out, "--random-seed", str(seed)],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed for {method.label!r} (seed {seed}, recipe "
                           f"{recipe}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return out, time.time() - t0


# -- data-free variants, merged as stock task_arithmetic with the weights they give ----------
def _block(name: str) -> str:
    """The transformer block of a tensor ("layers.N."), or the tensor itself."""
    parts = name.split(".")
    return ".".join(parts[: parts.index("layers") + 2]) + "." if "layers" in parts else name


def task_vector_grams(models: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Per transformer block (and per other tensor), the float64 Gram matrix of the task
    vectors, in DOMAINS order, computed from the checkpoints alone."""
    from safetensors.torch import load_file

    base = load_file(os.path.join(models["base"], "model.safetensors"))
    tuned = {d: load_file(os.path.join(models[d], "model.safetensors")) for d in DOMAINS}
    grams: Dict[str, torch.Tensor] = {}
    for name, b in base.items():
        v = torch.stack([(tuned[d][name].double() - b.double()).reshape(-1) for d in DOMAINS])
        key = _block(name)
        grams[key] = grams.get(key, 0) + v @ v.T
    return grams


def _normalised(values: torch.Tensor) -> Dict[str, float]:
    return {d: float(v / values.sum()) for d, v in zip(DOMAINS, values)}


EQUAL = "variant: equal contributions (lambda ~ 1/||delta||)"
PER_BLOCK = "variant: lambda per transformer block"
GRAM = "variant: Gram correction (G lambda = diag G)"
VARIANT_LABELS = (EQUAL, PER_BLOCK, GRAM)


def variant_methods(models: Dict[str, str]) -> List[Method]:
    """The ideas tried for a variant that beats the stock methods (rows 'variant: ...'),
    other than the plugin's own ``alpha`` (a row of METHODS)."""
    grams = task_vector_grams(models)
    whole = sum(grams.values())
    sq = whole.diagonal()
    out = [
        Method(EQUAL, "task_arithmetic",
               weights=tuple(_normalised(sq.rsqrt()).items()), group="variant"),
    ]
    per_block = {d: [] for d in DOMAINS}
    for key, gram in grams.items():
        for d, lam in _normalised(gram.diagonal()).items():
            per_block[d].append({"filter": key, "value": lam})
    for d in DOMAINS:  # mergekit needs a default after the filters
        per_block[d].append({"value": _normalised(sq)[d]})
    out.append(Method(PER_BLOCK, "task_arithmetic",
                      weights=tuple(per_block.items()), group="variant"))
    solved = torch.linalg.solve(whole, sq)  # <delta_merged, delta_t> = ||delta_t||^2 for every t
    out.append(Method(GRAM, "task_arithmetic",
                      weights=tuple((d, float(x)) for d, x in zip(DOMAINS, solved)),
                      group="variant"))
    return out


# -- scores and table -------------------------------------------------------------------
# bits per byte: below it a domain's kept share is mostly noise (a license fine-tune of a base
# that has seen the licenses gains ~0.05, and its kept share moves by up to ~0.6 between seeds)
MIN_GAIN = 0.08


def kept(losses: Dict[str, float], base: Dict[str, float], own: Dict[str, float]) -> Dict[str, float]:
    """Share of each domain's fine-tune gain a model keeps on held-out text."""
    return {d: (base[d] - losses[d]) / (base[d] - own[d]) for d in DOMAINS}


def _mean(values):
    return sum(values) / len(values)


def kept_overall(losses: Dict[str, float], base: Dict[str, float], own: Dict[str, float]) -> float:
    """Share of the fine-tunes' summed gain a model keeps: the paper's objective (the mean
    loss gap to each fine-tune on its own task), normalised; a domain counts in proportion
    to its fine-tune's gain, not as an equal share of the mean."""
    return sum(base[d] - losses[d] for d in DOMAINS) / sum(base[d] - own[d] for d in DOMAINS)


# the two scores of a row: its key in the summary, and its name in the table and verdicts
SCORES = (("per_seed", "mean kept"), ("overall_per_seed", "overall kept"))


def summarise(results: dict, seeds: List[int]) -> dict:
    """Per row: kept gain per domain, its mean over domains and the overall share, averaged
    over seeds, and both scores per seed."""
    rows = {}
    for seed in seeds:
        r = results[str(seed)]
        base, own = r["base"], {d: r["finetunes"][d][d] for d in DOMAINS}
        losses = dict(r["merges"])
        losses.update({f"single fine-tune: {d}": r["finetunes"][d] for d in DOMAINS})
        for label, loss in losses.items():
            per_domain = kept(loss, base, own)
            row = rows.setdefault(label, {"per_seed": [], "overall_per_seed": [],
                                          "domains": {d: [] for d in DOMAINS}})
            row["per_seed"].append(_mean([per_domain[d] for d in DOMAINS]))
            row["overall_per_seed"].append(kept_overall(loss, base, own))
            for d in DOMAINS:
                row["domains"][d].append(per_domain[d])
    for row in rows.values():
        row.update(mean=_mean(row["per_seed"]), sd=_sd(row["per_seed"]),
                   overall_mean=_mean(row["overall_per_seed"]), overall_sd=_sd(row["overall_per_seed"]))
    return rows


def _sd(values) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def verdicts(rows: dict, groups: Dict[str, str], key: str = "per_seed") -> List[str]:
    """Each metagpt and variant row against the weight average and the best task_arithmetic
    weight, on the score whose per-seed values are ``rows[label][key]``, paired by seed. The
    noise of a comparison is how much the two rows' scores move across seeds (the larger
    standard deviation); a win or a loss needs a mean difference beyond it and the same sign
    on every seed. Anything else is a tie."""
    best_ta = max(TA_GRID, key=lambda label: _mean(rows[label][key]))
    lines = [f"best task_arithmetic weight on this run: {best_ta}"]
    for label, row in rows.items():
        if groups.get(label) not in ("paper", "variant"):
            continue
        parts = []
        for other in (AVERAGE, best_ta):
            diffs = [a - b for a, b in zip(row[key], rows[other][key])]
            mean = _mean(diffs)
            noise = max(_sd(row[key]), _sd(rows[other][key]))
            same_sign = all(x > 0 for x in diffs) or all(x < 0 for x in diffs)
            word = ("wins" if mean > 0 else "loses") if abs(mean) > noise and same_sign else "ties"
            parts.append(f"{word} vs {other.split(' (')[0]} ({mean:+.3f}, noise {noise:.3f})")
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


def table(rows: dict) -> str:
    head = "| method | " + " | ".join(DOMAINS) + " | mean kept | per seed | overall kept | per seed |"
    lines = [head, "|" + "---|" * (len(DOMAINS) + 5)]
    for label, row in rows.items():
        domains = " | ".join(f"{_mean(row['domains'][d]):.3f}" for d in DOMAINS)
        cells = []
        for key, _ in SCORES:
            values = row[key]
            cells.append(f"**{_mean(values):.3f}** ± {_sd(values):.3f} | "
                         + ", ".join(f"{x:.3f}" for x in values))
        lines.append(f"| {label} | {domains} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _merge_all(methods, models, out_root, seed, jobs, threads):
    """Every merge of one seed, `jobs` at a time; the first failure cancels the rest."""
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(run_merge, m, models, out_root, seed, threads) for m in methods]
        try:
            return [f.result() for f in futures]
        except RuntimeError as exc:
            pool.shutdown(wait=True, cancel_futures=True)
            sys.exit(f"quality: {exc}")


def results_file(work: str, run_key: str, wanted=None) -> str:
    """Where a run's results go: a run of some rows (``--only``) in a file of its own, so
    that it never overwrites a full run's."""
    only = "" if wanted is None else "-only-" + hashlib.sha256(";".join(sorted(wanted)).encode()).hexdigest()[:8]
    return os.path.join(work, f"quality-results-{run_key}{only}.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run: shorter training, 2 seeds")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick 0,1)")
    ap.add_argument("--jobs", type=int, default=2, help="merges run at once (default 2)")
    ap.add_argument("--work", default=os.path.join(HERE, "..", "bench-work", "quality"),
                    help="models, merges and results (default bench-work/quality)")
    ap.add_argument("--only", help="semicolon-separated row labels to merge (default: all; the "
                    "results then go to a file of their own, beside a full run's)")
    ap.add_argument("--base-domains", default=",".join(Settings.base_domains),
                    help="comma-separated domains the base is trained on (default: "
                         f"{','.join(Settings.base_domains)}, so the license fine-tune learns a "
                         "domain new to the base); code,licenses,docs: a base that has seen "
                         "every domain")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    base_domains = tuple(d for d in DOMAINS if d in args.base_domains.split(","))
    unknown = set(args.base_domains.split(",")) - set(DOMAINS)
    if unknown or not base_domains:
        sys.exit(f"quality: --base-domains takes some of {', '.join(DOMAINS)}; got {args.base_domains}")
    settings = replace(settings, base_domains=base_domains)
    seeds = [int(x) for x in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    wanted = set(args.only.split(";")) if args.only else None
    labels = [m.label for m in METHODS] + list(VARIANT_LABELS)
    if wanted is not None and wanted - set(labels):
        sys.exit(f"quality: --only: no row {', '.join(repr(x) for x in sorted(wanted - set(labels)))}; "
                 "rows: " + "; ".join(labels))
    methods = [m for m in METHODS if wanted is None or m.label in wanted]
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.time()
    domains = load_domains(settings.max_bytes)
    windows = eval_windows(domains, settings)
    data = data_digest(domains)
    run_key = settings.key("finetunes", data)
    print("held-out bytes per domain: " + ", ".join(f"{d} {len(domains[d].held_out)}" for d in DOMAINS))
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    results_path = results_file(work, run_key, wanted)
    results, timings, groups = {}, {"train": 0.0, "merge": 0.0, "evaluate": 0.0}, {}
    for seed in seeds:
        t0 = time.time()
        models = ensure_finetunes(work, settings, seed, domains, data)
        timings["train"] += time.time() - t0
        t0 = time.time()
        seed_methods = methods + [m for m in variant_methods(models)
                                  if wanted is None or m.label in wanted]
        groups.update({m.label: m.group for m in seed_methods})
        out_root = os.path.join(work, f"merges-{run_key}", f"seed{seed}")
        os.makedirs(out_root, exist_ok=True)
        outs = _merge_all(seed_methods, models, out_root, seed, args.jobs, threads)
        timings["merge"] += time.time() - t0
        t0 = time.time()
        r = {"base": held_out_loss(load_model(models["base"]), windows),
             "finetunes": {d: held_out_loss(load_model(models[d]), windows) for d in DOMAINS},
             "merges": {}, "weights": {m.label: dict(m.weights) for m in seed_methods if m.weights}}
        for method, (out, _) in zip(seed_methods, outs):
            r["merges"][method.label] = held_out_loss(load_model(out), windows)
        timings["evaluate"] += time.time() - t0
        results[str(seed)] = r
        gains = {d: r["base"][d] - r["finetunes"][d][d] for d in DOMAINS}
        print(f"seed {seed}: {len(seed_methods)} merges, "
              f"{sum(s for _, s in outs) / max(1, len(outs)):.1f} s per merge; fine-tune gains "
              + ", ".join(f"{d} {g:.3f}" for d, g in gains.items()) + " bits/byte", flush=True)
        for d, g in gains.items():
            if g < MIN_GAIN:
                print(f"WARNING: seed {seed}: the {d} fine-tune gains only {g:.3f} bits/byte on "
                      f"its own domain; its kept shares are mostly noise", flush=True)
        with open(results_path, "w") as f:  # after every seed: a failure keeps what was done
            json.dump({"settings": asdict(settings), "format": FORMAT, "seeds": seeds,
                       "python": sys.version.split()[0], "torch": torch.__version__,
                       "losses_bits_per_byte": results}, f, indent=1)
    rows = summarise(results, list(results))
    with open(results_path) as f:
        report = json.load(f)
    report.update(rows=rows, seconds={k: round(v, 1) for k, v in timings.items()})
    with open(results_path, "w") as f:
        json.dump(report, f, indent=1)
    print()
    print(table(rows))
    print()
    if len(seeds) < 2:
        print("- one seed: no verdicts (they need the seed-to-seed noise)")
    elif AVERAGE in rows and all(label in rows for label in TA_GRID):
        for key, name in SCORES:
            print(f"{name}:")
            for line in verdicts(rows, groups, key):
                print("- " + line)
    print(f"\ntotal {time.time() - t_start:.0f} s (train {timings['train']:.0f}, "
          f"merge {timings['merge']:.0f}, evaluate {timings['evaluate']:.0f}); "
          f"results in {results_path}")


if __name__ == "__main__":
    main()
