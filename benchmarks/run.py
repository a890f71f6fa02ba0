"""MetaGPT vs mergekit's task_arithmetic on the same local models, side by side.

    python benchmarks/run.py [--sizes 10m,100m] [--runs 3] [--cuda] [--evict] [--work DIR]

For each size it writes a LLaMA-shaped bf16 family (base + 3 variants, sharded) once
(a size given as `100m-bin`: the same family as PyTorch `.bin` shards), then runs stock mergekit-yaml
alternately with task_arithmetic, metagpt with an empty norm cache (cold) and metagpt
with the norm cache filled (warm), each in a fresh process. It prints markdown tables:
medians of wall time and peak RSS and their ratios to task_arithmetic, the I/O floor
(reading every input once and writing the output once, measured in the same run) and
each method's ratio to it, peak GPU memory with --cuda, the pre-pass's read throughput
next to the sequential read speed of the same files, and where each method's time goes.

--evict drops the inputs from the page cache (posix_fadvise DONTNEED) before every run
and before the floor and read measurements, and again when metagpt's pre-pass ends, so
that every read comes from disk, as for models larger than memory.
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
    if size.endswith("-bin"):
        return _bin_family(work, size[: -len("-bin")])
    root = os.path.join(work, f"models-{size}")
    done = os.path.join(root, ".complete")
    paths = [os.path.join(root, n) for n in NAMES]
    if not os.path.exists(done):
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing {size} family ({SIZES[size].parameters / 1e6:.0f}M parameters) to {root}", flush=True)
        write_family(root, SIZES[size], names=NAMES, dtype="bfloat16", shard_bytes=100 * 2**20)
        open(done, "w").close()
    return paths


def _bin_family(work: str, size: str) -> list:
    """The safetensors family of `size`, re-saved as PyTorch .bin shards."""
    import torch
    from safetensors.torch import load_file

    root = os.path.join(work, f"models-{size}-bin")
    done = os.path.join(root, ".complete")
    sources = ensure_family(work, size)
    paths = [os.path.join(root, n) for n in NAMES]
    if os.path.exists(done):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    print(f"writing {size} family as .bin shards to {root}", flush=True)
    for source, path in zip(sources, paths):
        os.makedirs(path)
        for name in os.listdir(source):
            if not name.endswith((".safetensors", ".index.json")) and os.path.isfile(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), path)
        files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
        weight_map = {}
        for number, name in enumerate(files, 1):
            shard = f"pytorch_model-{number:05d}-of-{len(files):05d}.bin"
            tensors = load_file(os.path.join(source, name))
            torch.save(tensors, os.path.join(path, shard))
            weight_map.update({key: shard for key in tensors})
        with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    open(done, "w").close()
    return paths


def weight_files(paths: list) -> list:
    return [f for p in paths for pattern in ("*.safetensors", "*.bin") for f in glob.glob(os.path.join(p, pattern))]


def evict(paths: list) -> None:
    """Drop the files from the page cache (clean pages only; best effort)."""
    for file in weight_files(paths):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_floor_s(paths: list, work: str) -> float:
    """Seconds to read every input file once and write one model's worth of output
    (the base's size) once: what any merge of these models must at least do."""
    files = weight_files(paths)
    out_bytes = sum(os.path.getsize(f) for f in weight_files(paths[:1]))
    buffer = bytearray(16 * 2**20)
    target = os.path.join(work, "floor.out")
    started = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    with open(target, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(memoryview(buffer)[: min(len(buffer), left)])
    elapsed = time.perf_counter() - started
    with open(target, "rb") as f:  # written back now, not during the next measured run
        os.fsync(f.fileno())
    os.remove(target)
    return elapsed


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
    files = weight_files(paths)
    total, started = 0, time.perf_counter()
    buffer = bytearray(16 * 2**20)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / 1e9 / (time.perf_counter() - started)


def run_once(config: str, out: str, env: dict, cuda: bool, inputs=None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if inputs:
        evict(inputs)
    report = out + ".json"
    args = [sys.executable, os.path.join(HERE, "child.py"), report, "--", config, out,
            "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]
    if cuda:
        args += ["--cuda"]
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(report) as f:
        return json.load(f)


PHASES = ("startup", "planning", "prepass", "merge", "write", "exit")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10m,100m", help="comma-separated; SIZE-bin for .bin shards")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--evict", action="store_true", help="inputs dropped from the page cache before each run")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mergekit-metagpt-bench"))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, MERGEKIT_METAGPT_PROGRESS="0")
    rows = []
    for size in args.sizes.split(","):
        paths = ensure_family(args.work, size)
        inputs = paths if args.evict else None
        if inputs:
            listing = os.path.join(args.work, f"inputs-{size}.txt")
            with open(listing, "w") as f:
                f.write("\n".join(weight_files(paths)))
            env = dict(env, BENCH_EVICT_AFTER_PREPASS=listing)
        configs = {m: recipe(args.work, size, m, paths) for m in ("task_arithmetic", "metagpt")}
        warm_cache = os.path.join(args.work, f"cache-{size}-warm")
        shutil.rmtree(warm_cache, ignore_errors=True)
        run_once(configs["metagpt"], os.path.join(args.work, "out"), dict(env, MERGEKIT_METAGPT_CACHE_DIR=warm_cache), args.cuda)
        results = {"ta": [], "cold": [], "warm": []}
        floors = []
        for i in range(args.runs):
            out = os.path.join(args.work, "out")
            if inputs:
                evict(inputs)
            floors.append(io_floor_s(paths, args.work))
            results["ta"].append(run_once(configs["task_arithmetic"], out, env, args.cuda, inputs))
            cold_cache = tempfile.mkdtemp(dir=args.work, prefix="cold-cache-")
            results["cold"].append(run_once(configs["metagpt"], out, dict(env, MERGEKIT_METAGPT_CACHE_DIR=cold_cache), args.cuda, inputs))
            shutil.rmtree(cold_cache)
            results["warm"].append(run_once(configs["metagpt"], out, dict(env, MERGEKIT_METAGPT_CACHE_DIR=warm_cache), args.cuda, inputs))
            print(f"{size} run {i + 1}/{args.runs}: floor {floors[-1]:.2f}s, " + ", ".join(
                f"{k} {v[-1]['wall_s']:.2f}s" for k, v in results.items()), flush=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "peak_rss_mb")} for k, v in results.items()}
        gpu = {k: statistics.median(r.get("peak_gpu_mb", 0.0) for r in v) for k, v in results.items()}
        phases = {k: {p: statistics.median(r.get("phases", {}).get(p, 0.0) for r in v) for p in PHASES} for k, v in results.items()}
        pp = [r["prepass"] for r in results["cold"]]
        prepass_gbps = statistics.median(p["bytes_read"] / 1e9 / p["seconds"] for p in pp if p["seconds"])
        prepass_s = statistics.median(p["seconds"] for p in pp)
        if inputs:
            evict(inputs)
        base = size[: -len("-bin")] if size.endswith("-bin") else size
        rows.append((size, SIZES[base].parameters, med, gpu, phases, statistics.median(floors),
                     prepass_s, prepass_gbps, sequential_read_gbps(paths)))

    print()
    header = ("| size | params | task_arithmetic s | metagpt cold s | ratio | metagpt warm s | ratio "
              "| TA RSS MB | cold RSS MB | ratio | warm RSS MB | ratio | I/O floor s | TA / floor | cold / floor "
              "| pre-pass s | pre-pass GB/s | seq. read GB/s | pre-pass / seq. read |")
    if args.cuda:
        header += " TA GPU MB | cold GPU MB | warm GPU MB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size, params, med, gpu, _, floor, prepass_s, gbps, seq in rows:
        ta, cold, warm = med["ta"], med["cold"], med["warm"]
        line = (f"| {size} | {params / 1e6:.0f}M | {ta['wall_s']:.2f} | {cold['wall_s']:.2f} | {cold['wall_s'] / ta['wall_s']:.2f}x "
                f"| {warm['wall_s']:.2f} | {warm['wall_s'] / ta['wall_s']:.2f}x | {ta['peak_rss_mb']:.0f} | {cold['peak_rss_mb']:.0f} "
                f"| {cold['peak_rss_mb'] / ta['peak_rss_mb']:.2f}x | {warm['peak_rss_mb']:.0f} | {warm['peak_rss_mb'] / ta['peak_rss_mb']:.2f}x "
                f"| {floor:.2f} | {ta['wall_s'] / floor:.1f}x | {cold['wall_s'] / floor:.1f}x "
                f"| {prepass_s:.2f} | {gbps:.2f} | {seq:.2f} | {gbps / seq:.0%} |")
        if args.cuda:
            line += f" {gpu['ta']:.0f} | {gpu['cold']:.0f} | {gpu['warm']:.0f} |"
        print(line)

    print("\nWhere the time goes (seconds, medians):\n")
    print("| size | method | " + " | ".join(PHASES) + " |")
    print("|" + "---|" * (len(PHASES) + 2))
    for size, _, _, _, phases, *_ in rows:
        for key, label in (("ta", "task_arithmetic"), ("cold", "metagpt cold"), ("warm", "metagpt warm")):
            print(f"| {size} | {label} | " + " | ".join(f"{phases[key][p]:.2f}" for p in PHASES) + " |")
    print(f"\nmedians of {args.runs} runs each, alternating; models in bf16; "
          f"metagpt cold = empty norm cache, warm = norm cache filled by an earlier run"
          + ("; inputs evicted from the page cache before every run" if args.evict else "; inputs in the page cache"))


if __name__ == "__main__":
    main()
