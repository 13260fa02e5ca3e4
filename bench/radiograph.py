"""How long `model.radiograph.synthesize_chest_xray` takes for one 512 x 512 image with two opacities.

    nice -n 10 python bench/radiograph.py            # 10 timed runs after one warm-up
    python bench/radiograph.py --repeats 50

A benchmark, not a test (issue 13, item 8: it was `tests/test_radiograph.py::test_timing_512`,
which could not fail and timed whatever else shared the machine).  Prints median and minimum.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.radiograph import synthesize_chest_xray  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    synthesize_chest_xray(rng, num_opacities=2)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        synthesize_chest_xray(rng, num_opacities=2)
        times.append(time.perf_counter() - start)
    print(f"synthesize_chest_xray 512x512, 2 opacities: median {1000 * np.median(times):.1f} ms, "
          f"min {1000 * min(times):.1f} ms over {args.repeats} runs")


if __name__ == "__main__":
    main()
