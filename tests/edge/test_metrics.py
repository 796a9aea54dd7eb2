"""Edge run accounting: the peak memory a run reports is its own process's."""

import subprocess
import sys

from edge.training.metrics import peak_rss_mb
from tests.conftest import REPO


def test_peak_rss_is_the_process_own_not_its_parents():
    ballast = bytearray(1200 * 2**20)  # 1.2 GiB, touched so it is resident
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    assert peak_rss_mb() > 1200
    out = subprocess.run([sys.executable, "-c", "from edge.training.metrics import peak_rss_mb; print(peak_rss_mb())"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    child = float(out.stdout.strip())
    assert 10 < child < 900, child  # torch's import, not the parent's 1.2 GiB (ru_maxrss would say > 1200)
    del ballast
