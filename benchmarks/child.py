"""Run stock mergekit-yaml in this process and report wall time, peak RSS, GPU memory.

Usage: python benchmarks/child.py REPORT.json -- <mergekit-yaml arguments>
"""

import atexit
import json
import resource
import sys
import time


def main():
    report, args = sys.argv[1], sys.argv[3:]
    started = time.perf_counter()

    def write_report():
        data = {
            "wall_s": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        try:
            import torch

            if torch.cuda.is_available():
                data["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except Exception:
            pass
        prepass = sys.modules.get("mergekit_metagpt.prepass")
        if prepass is not None:
            data["prepass"] = vars(prepass.STATS)
        with open(report, "w") as f:
            json.dump(data, f)

    atexit.register(write_report)
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    sys.argv = ["mergekit-yaml", *args]
    mergekit_yaml()


if __name__ == "__main__":
    main()
