"""The ``mergekit-metagpt`` command: coefficients of a recipe, and demo checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from mergekit_metagpt.errors import MetaGPTError


def _compute(recipe_path: str, cuda: bool):
    import torch
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    import mergekit_metagpt  # noqa: F401  (registers the methods)
    from mergekit_metagpt.coefficients import Coefficients
    from mergekit_metagpt.norms import total
    from mergekit_metagpt.prepass import checkpoint_norms
    from mergekit_metagpt.recipe import base_and_models, check_bakeable, load_recipe

    config = load_recipe(recipe_path)
    base, models = base_and_models(config, recipe_path)
    check_bakeable(config, recipe_path)
    LoaderCache().setup(MergeOptions())
    device = torch.device("cuda" if cuda else "cpu")
    norms = checkpoint_norms(base, models, device)
    return config, base, Coefficients.from_norms({m: total(norms[m]) for m in models})


def _coefficients(args) -> int:
    _config, base, coefficients = _compute(args.recipe, args.cuda)
    if args.json:
        print(json.dumps({
            "base_model": str(base),
            "models": [
                {"model": str(m), "squared_norm": n, "lambda": coefficients.lambdas[m]}
                for m, n in coefficients.squared_norms
            ],
        }, indent=2))
    else:
        print(coefficients.table())
    return 0


def _bake(args) -> int:
    from mergekit_metagpt.recipe import baked_recipe

    config, base, coefficients = _compute(args.recipe, args.cuda)
    text = baked_recipe(args.recipe, coefficients)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0


def _demo_models(args) -> int:
    from mergekit_metagpt.synthetic import SIZES, write_family

    paths = write_family(args.directory, SIZES[args.size], dtype=args.dtype)
    print("\n".join(paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergekit-metagpt", description="MetaGPT tools for mergekit recipes"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    coeff = sub.add_parser("coefficients", help="print each model's ||delta||^2 and lambda")
    coeff.add_argument("recipe")
    coeff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    coeff.add_argument("--cuda", action="store_true", help="compute on the GPU")
    coeff.set_defaults(run=_coefficients)
    bake = sub.add_parser("bake", help="write an equivalent stock mergekit recipe with the lambdas as weights")
    bake.add_argument("recipe")
    bake.add_argument("output")
    bake.add_argument("--cuda", action="store_true", help="compute on the GPU")
    bake.set_defaults(run=_bake)
    demo = sub.add_parser("demo-models", help="write a small local base + math/code/chat family")
    demo.add_argument("directory")
    demo.add_argument("--size", default="tiny", choices=["tiny", "10m", "100m", "1b"])
    demo.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    demo.set_defaults(run=_demo_models)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (MetaGPTError, OSError, RuntimeError) as error:
        message = " ".join(str(error).split())  # always one line
        print(f"mergekit-metagpt: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
