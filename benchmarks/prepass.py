"""The pre-pass alone, in process: its read throughput against the sequential read rate.

    python benchmarks/prepass.py [--sizes 100m,1b] [--devices cpu,cuda] [--runs 3] [--work DIR]

Plans the metagpt recipe of each benchmark family (benchmarks/run.py writes them) with
mergekit's planner and times ``prepass.compute`` with the norm cache off, alternating
the variants in one process: on CPU as it is; on CUDA with the pinned-buffer staging
(the default) and with plain ``tensor.to("cuda")`` copies. Prints GB/s of checkpoint
bytes read, the sequential page-cache read rate of the same files (plain ``read()``),
and their ratio; on CUDA also the pre-pass's peak GPU memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from run import ensure_family, recipe, sequential_read_gbps  # noqa: E402


def plan(config_path: str, device: str):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_metagpt.planning import plan_recipe

    with open(config_path) as f:
        config = MergeConfiguration.model_validate(yaml.safe_load(f))
    return plan_recipe(config, MergeOptions(quiet=True, device=device))


def timed_prepass(config_path: str, device: str, pinned: bool) -> dict:
    import torch
    from mergekit.io.tasks import LoaderCache

    from mergekit_metagpt import prepass

    LoaderCache().flush_all()
    run = plan(config_path, device)
    prepass.clear_memo()
    prepass.PINNED_STAGING = pinned
    before = prepass.STATS.bytes_read
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    started = time.perf_counter()
    result = prepass.compute(run, torch.device(device))
    seconds = time.perf_counter() - started  # compute() ends with the values on the host
    nbytes = prepass.STATS.bytes_read - before
    out = {"seconds": seconds, "gbps": nbytes / 1e9 / seconds, "bytes": nbytes,
           "norms": [s.coefficients.squared_norms for s in result.sets]}
    if device == "cuda":
        out["peak_gpu_mb"] = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100m")
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mergekit-metagpt-bench"))
    args = parser.parse_args()
    os.environ["MERGEKIT_METAGPT_CACHE"] = "0"
    os.environ.setdefault("MERGEKIT_METAGPT_PROGRESS", "0")
    os.makedirs(args.work, exist_ok=True)
    variants = []
    for device in args.devices.split(","):
        variants += [(device, True), (device, False)] if device == "cuda" else [(device, True)]
    rows = []
    for size in args.sizes.split(","):
        paths = ensure_family(args.work, size)
        config = recipe(args.work, size, "metagpt", paths)
        timed_prepass(config, variants[0][0], variants[0][1])  # first touch: files into the page cache
        seq = sequential_read_gbps(paths)  # after it: measured before, it could read from disk
        results = {v: [] for v in variants}
        for _ in range(args.runs):
            for variant in variants:
                results[variant].append(timed_prepass(config, *variant))
        reference = results[variants[0]][0]["norms"]
        for variant, runs in results.items():
            for r in runs:  # every variant computes the same norms
                for got, want in zip(r["norms"], reference):
                    for (m, a), (_, b) in zip(got, want):
                        assert abs(a - b) <= 1e-6 * abs(b), (variant, m, a, b)
            rows.append((size, variant, statistics.median(r["seconds"] for r in runs),
                         statistics.median(r["gbps"] for r in runs), seq,
                         max(r.get("peak_gpu_mb", 0.0) for r in runs), runs[0]["bytes"]))
    print("\n| size | device | copies | GB read | pre-pass s | pre-pass GB/s | seq. read GB/s | ratio | peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, (device, pinned), seconds, gbps, seq, gpu, nbytes in rows:
        copies = "-" if device != "cuda" else ("pinned, chunked" if pinned else "tensor.to")
        print(f"| {size} | {device} | {copies} | {nbytes / 1e9:.2f} | {seconds:.2f} | {gbps:.2f} | {seq:.2f} "
              f"| {gbps / seq:.0%} | {gpu:.0f} |")
    print(f"\nmedians of {args.runs} alternating runs; norm cache off; inputs in the page cache")


if __name__ == "__main__":
    main()
