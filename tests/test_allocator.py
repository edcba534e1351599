"""CPU actors keep freed memory in glibc's heap (``keep_freed_memory``): an activation-sized block
is served from the heap and reused, not mapped from the kernel and faulted in again each batch.

Observed through glibc's own accounting (``mallinfo2``: bytes in blocks mapped on their own), in
fresh interpreters, since the setting is process-wide and cannot be undone.
"""

import pytest
from conftest import SMALL_MODEL
from fresh import run_fresh

from detectflow.cli import build_parser
from detectflow.config import RunConfig
from detectflow.pipeline import plan_resources

MAPPED_AFTER_20_MIB = """
import ctypes, json, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
{setup}
before = libc.mallinfo2().hblkhd
block = torch.ones(5 << 20)  # 20 MiB, the size of a large activation
print(json.dumps({{"applied": applied, "mapped_mib": (libc.mallinfo2().hblkhd - before) >> 20}}))
"""


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018
    except AttributeError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc >= 2.33 only (mallinfo2)")


def test_large_blocks_come_from_the_heap_once_applied():
    plain = run_fresh(MAPPED_AFTER_20_MIB.format(setup="applied = False"))
    kept = run_fresh(MAPPED_AFTER_20_MIB.format(
        setup="from detectflow.allocator import keep_freed_memory\napplied = keep_freed_memory()"))
    assert plain == {"applied": False, "mapped_mib": 20}  # glibc's default: mapped on its own
    assert kept == {"applied": True, "mapped_mib": 0}


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_detector_applies_it_unless_told_not_to(small_weights, keep):
    setup = (f"from detectflow.predictor import Detector\n"
             f"Detector({SMALL_MODEL!r}, {str(small_weights)!r}, 0.5, run_id='x', device='cpu',"
             f" keep_freed_memory={keep})\napplied = {keep}")
    out = run_fresh(MAPPED_AFTER_20_MIB.format(setup=setup))
    assert out["mapped_mib"] == (0 if keep else 20)


@pytest.mark.parametrize("keep", [True, False])
def test_a_decode_task_applies_it_when_told(sample_dir, keep):
    uris = [str(p) for p in sorted(sample_dir.glob("*.jpg"))][:2]
    setup = (f"import pyarrow as pa\nfrom detectflow.predictor import decode_batch\n"
             f"listing = pa.table({{'image_uri': {uris!r}, 'index': [0, 1], 'shard': [0, 0]}})\n"
             f"assert decode_batch(listing, 4096, keep_freed_memory={keep}).num_rows == 2\n"
             f"applied = {keep}")
    out = run_fresh(MAPPED_AFTER_20_MIB.format(setup=setup))
    assert out["mapped_mib"] == (0 if keep else 20)


def test_the_plan_keeps_freed_memory_in_cpu_actors_only():
    cpu = plan_resources(RunConfig(), {"CPU": 2})
    gpu = plan_resources(RunConfig(), {"CPU": 16, "GPU": 1})
    assert cpu.keep_freed_memory and "freed memory kept" in cpu.describe()
    assert not gpu.keep_freed_memory
    assert not plan_resources(RunConfig(keep_freed_memory=False), {"CPU": 2}).keep_freed_memory
    assert build_parser().parse_args(["run", "--no-keep-freed-memory"]).keep_freed_memory is False
    assert "keep_freed_memory" not in vars(build_parser().parse_args(["run"]))  # field default
    assert RunConfig().keep_freed_memory is True
