"""The benchmark's memory sampler: cheap RSS at every sample, PSS taken as soon as RSS grows."""

import subprocess
import sys

from benchmarks.measure import MemorySampler

MIB = 1 << 20
# A child that starts small, then touches 200 MiB of its own pages for 1.5 s and exits.
GROW = ("import time; time.sleep(0.8); x = bytearray(200 << 20); "
        "x[::4096] = b'\\x01' * (len(x) // 4096); time.sleep(1.5)")


def test_sampler_sees_a_peak_that_comes_after_the_first_pss_sample():
    proc = subprocess.Popen([sys.executable, "-c", GROW])
    # PSS's own period (60 s) never comes: PSS is taken first at 0.2 s, while the child is
    # small, then again only because RSS grew.
    with MemorySampler(pid=proc.pid, period=0.2, pss_period=60) as mem:
        assert proc.wait(timeout=60) == 0
    # Private pages count fully in both sums.
    assert mem.peaks.rss >= 200 * MIB, mem.peaks
    assert 200 * MIB <= mem.peaks.pss <= mem.peaks.rss + 16 * MIB, mem.peaks


def test_sampler_counts_the_services_a_run_uses():
    """The whole flow against long-lived services: their processes (not the run's children)
    count too, through ``also``. Two samplers over the same seconds, with and without it."""
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    service = subprocess.Popen([sys.executable, "-c", GROW])
    with MemorySampler(pid=run.pid, period=0.2, pss_period=60) as alone, \
            MemorySampler(pid=run.pid, period=0.2, pss_period=60, also=(service.pid,)) as both:
        assert service.wait(timeout=60) == 0
    run.wait(timeout=60)
    assert alone.peaks.rss < 100 * MIB, alone.peaks  # the sleeping run only
    assert both.peaks.rss >= 200 * MIB, both.peaks
