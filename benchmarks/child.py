"""Run stock mergekit-yaml in this process and report wall time, peak RSS, GPU memory,
and where the time went.

Usage: python benchmarks/child.py REPORT.json -- <mergekit-yaml arguments>

Phases (seconds, measured here by timing wrappers around mergekit functions; the
benchmark's own instrumentation, not the plugin's):
  startup   process start to run_merge (Python, torch, mergekit imports, recipe)
  planning  MergePlanner.plan_to_disk
  prepass   MetaGPT's prepass.run_norms: planning the reads, the norm cache, reading
            and summing, the record (0 for other methods)
  write     TensorWriter.save_tensor + finalize (serialising the output shards)
  merge     the rest of run_merge (reading inputs, merging, config and card)
  exit      run_merge's return to the process's end

With BENCH_EVICT_AFTER_PREPASS=FILE (a list of paths, one per line), the inputs are
dropped from the page cache again when the pre-pass ends, so that the merge reads them
from disk as it would for a model larger than memory.
"""

import atexit
import functools
import json
import os
import resource
import sys
import time

STARTED = time.perf_counter()
PHASES = {"planning": 0.0, "prepass": 0.0, "write": 0.0}
MARKS = {}


def timed(owner, name, phase):
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            PHASES[phase] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main():
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit(__doc__)
    report, args = sys.argv[1], sys.argv[3:]

    def write_report():
        ended = time.perf_counter()
        data = {
            "wall_s": ended - STARTED,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        try:
            import torch

            if torch.cuda.is_available():
                data["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception:
            pass
        prepass = sys.modules.get("mergekit_metagpt.prepass")
        data["prepass"] = vars(prepass.STATS) if prepass is not None else {}
        if "merge_start" in MARKS and "merge_end" in MARKS:
            pre = PHASES["prepass"]
            inside = MARKS["merge_end"] - MARKS["merge_start"]
            data["phases"] = {
                "startup": MARKS["merge_start"] - STARTED,
                "planning": PHASES["planning"],
                "prepass": pre,
                "write": PHASES["write"],
                "merge": inside - PHASES["planning"] - pre - PHASES["write"],
                "exit": ended - MARKS["merge_end"],
            }
        with open(report, "w") as f:
            json.dump(data, f)

    atexit.register(write_report)
    from mergekit.io.tensor_writer import TensorWriter
    from mergekit.plan import MergePlanner
    from mergekit.scripts import run_yaml

    timed(MergePlanner, "plan_to_disk", "planning")
    timed(TensorWriter, "save_tensor", "write")
    timed(TensorWriter, "finalize", "write")
    run_merge = run_yaml.run_merge

    @functools.wraps(run_merge)
    def marked(*a, **k):
        MARKS["merge_start"] = time.perf_counter()
        try:
            return run_merge(*a, **k)
        finally:
            MARKS["merge_end"] = time.perf_counter()

    run_yaml.run_merge = marked
    with open(args[0]) as f:  # the recipe: only a metagpt run imports the plugin here
        metagpt = "metagpt" in f.read()
    if metagpt:
        from mergekit_metagpt import prepass

        timed(prepass, "run_norms", "prepass")
    evict_list = os.environ.get("BENCH_EVICT_AFTER_PREPASS")
    if evict_list and metagpt:
        from mergekit.io.tasks import LoaderCache

        compute = prepass.compute

        @functools.wraps(compute)
        def compute_then_evict(*a, **k):
            try:
                return compute(*a, **k)
            finally:
                LoaderCache().flush_all()  # mapped or unpickled shards would stay in memory
                with open(evict_list) as f:
                    for path in f.read().split("\n"):
                        if path:
                            fd = os.open(path, os.O_RDONLY)
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                            os.close(fd)

        prepass.compute = compute_then_evict
    sys.argv = ["mergekit-yaml", *args]
    run_yaml.main()


if __name__ == "__main__":
    main()
