"""MetaGPT vs mergekit's task_arithmetic on the same local models, side by side.

    python benchmarks/run.py [--sizes 10m,100m] [--runs 3] [--cuda] [--work DIR]

For each size it writes a LLaMA-shaped bf16 family (base + 3 variants, sharded) once,
then runs stock mergekit-yaml alternately with task_arithmetic, metagpt with an empty
norm cache (cold) and metagpt with the norm cache filled (warm), each in a fresh
process. It prints one markdown table: medians of wall time and peak RSS and their
ratios to task_arithmetic, peak GPU memory with --cuda, and the pre-pass's read
throughput next to the sequential read speed of the same files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mergekit_metagpt.synthetic import SIZES, write_family  # noqa: E402

NAMES = ("base", "math", "code", "chat")


def ensure_family(work: str, size: str) -> list:
    root = os.path.join(work, f"models-{size}")
    done = os.path.join(root, ".complete")
    paths = [os.path.join(root, n) for n in NAMES]
    if not os.path.exists(done):
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing {size} family ({SIZES[size].parameters / 1e6:.0f}M parameters) to {root}", flush=True)
        write_family(root, SIZES[size], names=NAMES, dtype="bfloat16", shard_bytes=100 * 2**20)
        open(done, "w").close()
    return paths


def recipe(work: str, size: str, method: str, paths: list) -> str:
    lines = [f"merge_method: {method}", f"base_model: {paths[0]}", "dtype: bfloat16", "models:"]
    for p in paths[1:]:
        lines.append(f"  - model: {p}")
        if method == "task_arithmetic":
            lines.append("    parameters: {weight: 0.3333}")
    path = os.path.join(work, f"{size}-{method}.yml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def sequential_read_gbps(paths: list) -> float:
    files = [f for p in paths for f in glob.glob(os.path.join(p, "*.safetensors"))]
    total, started = 0, time.perf_counter()
    buffer = bytearray(16 * 2**20)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / 1e9 / (time.perf_counter() - started)


def run_once(config: str, out: str, env: dict, cuda: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    report = out + ".json"
    args = [sys.executable, os.path.join(HERE, "child.py"), report, "--", config, out,
            "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]
    if cuda:
        args += ["--cuda"]
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(report) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10m,100m")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mergekit-metagpt-bench"))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, MERGEKIT_METAGPT_PROGRESS="0")
    rows = []
    for size in args.sizes.split(","):
        paths = ensure_family(args.work, size)
        configs = {m: recipe(args.work, size, m, paths) for m in ("task_arithmetic", "metagpt")}
        warm_cache = os.path.join(args.work, f"cache-{size}-warm")
        shutil.rmtree(warm_cache, ignore_errors=True)
        run_once(configs["metagpt"], os.path.join(args.work, "out"), dict(env, MERGEKIT_METAGPT_CACHE_DIR=warm_cache), args.cuda)
        results = {"ta": [], "cold": [], "warm": []}
        for i in range(args.runs):
            out = os.path.join(args.work, "out")
            results["ta"].append(run_once(configs["task_arithmetic"], out, env, args.cuda))
            cold_cache = tempfile.mkdtemp(dir=args.work, prefix="cold-cache-")
            results["cold"].append(run_once(configs["metagpt"], out, dict(env, MERGEKIT_METAGPT_CACHE_DIR=cold_cache), args.cuda))
            shutil.rmtree(cold_cache)
            results["warm"].append(run_once(configs["metagpt"], out, dict(env, MERGEKIT_METAGPT_CACHE_DIR=warm_cache), args.cuda))
            print(f"{size} run {i + 1}/{args.runs}: " + ", ".join(
                f"{k} {v[-1]['wall_s']:.2f}s" for k, v in results.items()), flush=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "peak_rss_mb")} for k, v in results.items()}
        gpu = {k: statistics.median(r.get("peak_gpu_mb", 0.0) for r in v) for k, v in results.items()}
        pp = [r["prepass"] for r in results["cold"]]
        prepass_gbps = statistics.median(p["bytes_read"] / 1e9 / p["seconds"] for p in pp if p["seconds"])
        prepass_s = statistics.median(p["seconds"] for p in pp)
        rows.append((size, SIZES[size].parameters, med, gpu, prepass_s, prepass_gbps, sequential_read_gbps(paths)))

    print()
    header = ("| size | params | task_arithmetic s | metagpt cold s | ratio | metagpt warm s | ratio "
              "| TA RSS MB | cold RSS MB | ratio | warm RSS MB | ratio | pre-pass s | pre-pass GB/s | seq. read GB/s |")
    if args.cuda:
        header += " TA GPU MB | cold GPU MB | warm GPU MB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size, params, med, gpu, prepass_s, gbps, seq in rows:
        ta, cold, warm = med["ta"], med["cold"], med["warm"]
        line = (f"| {size} | {params / 1e6:.0f}M | {ta['wall_s']:.2f} | {cold['wall_s']:.2f} | {cold['wall_s'] / ta['wall_s']:.2f}x "
                f"| {warm['wall_s']:.2f} | {warm['wall_s'] / ta['wall_s']:.2f}x | {ta['peak_rss_mb']:.0f} | {cold['peak_rss_mb']:.0f} "
                f"| {cold['peak_rss_mb'] / ta['peak_rss_mb']:.2f}x | {warm['peak_rss_mb']:.0f} | {warm['peak_rss_mb'] / ta['peak_rss_mb']:.2f}x "
                f"| {prepass_s:.2f} | {gbps:.2f} | {seq:.2f} |")
        if args.cuda:
            line += f" {gpu['ta']:.0f} | {gpu['cold']:.0f} | {gpu['warm']:.0f} |"
        print(line)
    print(f"\nmedians of {args.runs} runs each, alternating; models in bf16; "
          f"metagpt cold = empty norm cache, warm = norm cache filled by an earlier run")


if __name__ == "__main__":
    main()
