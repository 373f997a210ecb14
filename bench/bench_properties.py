"""A long run of the generator's property test: many more random networks than CI checks.

Runs ``tests/test_properties.py`` (random CNNs with conv, grouped and depthwise conv,
BatchNorm, add, concat, channel slices and padding, pooling, flatten or a literal view and
linear layers; kill channels, generate, compare outputs) with ``--examples`` networks and
prints how many passed, how many failed and how long it took.

    python bench/bench_properties.py [--examples 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="random networks to check (CI checks 30)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed, for a reproducible run")
    args = parser.parse_args()
    env = {**os.environ, "DNNSHRINK_PROPERTY_EXAMPLES": str(args.examples)}
    command = [sys.executable, "-m", "pytest", "-q", "tests/test_properties.py", "--hypothesis-show-statistics",
               f"--hypothesis-seed={args.seed}", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    counts = re.search(r"(\d+) passing examples, (\d+) failing examples, (\d+) invalid examples", run.stdout)
    if run.returncode != 0 or counts is None:
        print(run.stdout[-6000:], run.stderr[-2000:], sep="\n")
        print(f"property run FAILED after {seconds:.0f} s (seed {args.seed})")
        return 1
    passing, failing, invalid = map(int, counts.groups())
    print(f"{passing} random networks passed, {failing} failed, {invalid} invalid; seed {args.seed}; "
          f"{seconds:.0f} s ({seconds / max(passing, 1) * 1e3:.0f} ms per network)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
