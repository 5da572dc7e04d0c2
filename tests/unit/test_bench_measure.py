"""The bench's child-process measurement: a child's peak memory is its own, not its parent's."""
import sys

import numpy as np

from llmship.bench.measure import run_measured


def test_child_peak_rss_is_its_own_and_sees_what_it_allocates():
    held = np.ones(1536 * 2**20 // 8)  # 1.5 GiB resident here, in the parent
    small = run_measured([sys.executable, "-c", "import time; time.sleep(0.5)"])
    big = run_measured([sys.executable, "-c", "import numpy as np, time; a = np.ones(400 * 2**20 // 8); time.sleep(0.5)"])
    assert held.sum() > 0 and small.returncode == big.returncode == 0
    assert small.peak_rss_mb < 200
    assert 400 < big.peak_rss_mb < 1000
    assert big.wall_s >= 0.5
