"""The ``mergekit-metagpt`` command: coefficients of a recipe, bake, and demo checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from mergekit_metagpt.errors import MetaGPTError


def _plan_and_norms(recipe_path: str, cuda: bool, before_planning=None):
    """Validate and plan the recipe as ``mergekit-yaml`` would, then run the pre-pass."""
    import torch
    from mergekit.options import MergeOptions

    import mergekit_metagpt  # noqa: F401  (registers the methods)
    from mergekit_metagpt.planning import plan_recipe
    from mergekit_metagpt.prepass import run_norms
    from mergekit_metagpt.recipe import check_metagpt, load_recipe
    from mergekit_metagpt.registration import methods

    config = load_recipe(recipe_path)
    check_metagpt(config, recipe_path)
    if before_planning is not None:
        before_planning(config)
    run = plan_recipe(config, MergeOptions(quiet=True))
    method = next(m for m in methods() if m.spec.name == run.method_name)
    run_norms(run, torch.device("cuda" if cuda else "cpu"), method)
    return run


def _coefficients(args) -> int:
    from mergekit_metagpt.record import record_payload

    run = _plan_and_norms(args.recipe, args.cuda)
    if args.json:
        print(json.dumps(record_payload(run), indent=2))
        return 0
    sets = run.result.sets
    for number, set_norms in enumerate(sets, 1):
        if len(sets) > 1:
            print(f"{'' if number == 1 else chr(10)}model set {number} of {len(sets)}: "
                  f"base {set_norms.merge_set.base}, {len(set_norms.merge_set.tasks)} tensors")
        print(set_norms.coefficients.table())
    return 0


def _bake(args) -> int:
    from mergekit_metagpt.recipe import baked_recipe, check_bakeable, check_bakeable_recipe

    run = _plan_and_norms(args.recipe, args.cuda, lambda c: check_bakeable_recipe(c, args.recipe))
    check_bakeable(run, args.recipe)
    (set_norms,) = run.result.sets
    text = baked_recipe(args.recipe, run, set_norms.coefficients)
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
    coeff = sub.add_parser("coefficients", help="print each model's ||delta||^2 and lambda, per model set")
    coeff.add_argument("recipe")
    coeff.add_argument("--json", action="store_true",
                       help="print JSON (the shape of the merge's metagpt_coefficients.json)")
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
    except KeyboardInterrupt:
        print("mergekit-metagpt: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every error is one line; mergekit's and pydantic's too
        from mergekit_metagpt.planning import _one_line

        print(f"mergekit-metagpt: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
