import sys
import time

import numpy as np
import pytest

from helpers.memory import FreeReport, Measurement, free_memory, measure, rss_bytes

MiB = 2**20


def test_measure_sees_a_held_allocation():
    import mmap

    # its own anonymous mapping, every page touched: a malloc'ed array could reuse heap pages that
    # earlier tests freed and that are still resident, and the RSS would not rise by all of it
    block = mmap.mmap(-1, 200 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with measure("hold") as m:
        np.frombuffer(block, dtype=np.uint8)[:] = 1  # touched pages: really resident
        time.sleep(0.02)
    assert m.wall_s >= 0.02
    assert m.peak_rss_delta >= 180 * MiB
    assert m.rss_after - m.rss_before >= 180 * MiB
    block.close()


def test_measure_catches_a_spike_that_is_gone_by_the_end():
    import mmap

    # its own anonymous mapping, touched then unmapped: a malloc'ed array could reuse heap pages that
    # earlier tests left resident, and would stay in the heap after it is freed
    with measure("spike") as m:
        region = mmap.mmap(-1, 300 * MiB)
        np.frombuffer(region, dtype=np.uint8)[:] = 1  # every page written: resident
        time.sleep(0.05)  # long enough for the sampler too, where the kernel's counter is unavailable
        region.close()
    assert m.peak_rss_delta >= 250 * MiB, m
    assert m.rss_after < m.peak_rss - 200 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's high-water mark is Linux only")
def test_linux_uses_the_kernel_peak():
    with measure() as m:
        pass
    assert m.rss_method == "kernel"


def test_measurement_reports():
    with measure("label") as m:
        pass
    assert isinstance(m, Measurement)
    text = str(m)
    assert text.startswith("label: ") and "peak RSS" in text
    d = m.as_dict()
    assert set(d) == {"label", "wall_s", "rss_before_bytes", "rss_after_bytes", "peak_rss_bytes", "peak_gpu_bytes"}


def test_measure_records_even_when_the_block_fails():
    with pytest.raises(ValueError):
        with measure() as m:
            raise ValueError("boom")
    assert m.wall_s > 0 and m.peak_rss > 0


def test_free_memory_collects_unreachable_cycles():
    class Holder:
        pass

    a, b = Holder(), Holder()
    a.other, b.other = b, a  # a reference cycle: only the garbage collector frees it
    a.payload = np.ones(200 * MiB, dtype=np.uint8)
    del a, b
    report = free_memory()
    assert isinstance(report, FreeReport)
    assert report.freed >= 150 * MiB
    assert "RSS" in str(report) and "freed" in str(report)
    assert abs(report.rss_after - rss_bytes()) < 50 * MiB


def test_nested_blocks_keep_the_outer_peak():
    # sampling off (one sample a minute): only the kernel's counter, handed over, can see the spike
    with measure("outer", interval_s=60) as outer:
        spike = np.ones(300 * MiB, dtype=np.uint8)
        del spike
        with measure("inner", interval_s=60) as inner:
            pass
    assert inner.peak_rss_delta < 100 * MiB
    assert outer.peak_rss_delta >= 250 * MiB
