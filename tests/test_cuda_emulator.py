"""The SIMT emulation layer (csrc/cuda/simt_emu.h) on small kernels of its own: shuffles, shared
memory and barriers give the right answers in every thread order and with both context
switchers; a missing barrier, a deadlock, a divergent barrier, a partial warp mask and a shared
memory overrun are reported; unwritten shared memory reads as NaN.

The module sparse_attn._cuda_emu is built wherever the CUDA kernels are (SPARSE_ATTN_CUDA=AUTO
with nvcc found, or ON); these tests are skipped only in a build without CUDA.
"""

import numpy as np
import pytest
import sparse_attn as sa

if not sa.build_info()["cuda_compiled"]:
    pytest.skip("this build has no CUDA kernels, so no emulator", allow_module_level=True)

from sparse_attn import _cuda_emu as emu

ORDERS = ["forward", "reverse", "shuffled"]


@pytest.fixture(autouse=True)
def default_schedule():
    yield
    emu.set_schedule("forward", 0, "default")


@pytest.mark.parametrize("switcher", ["default", "ucontext"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_sum(order, switcher, threads):
    emu.set_schedule(order, 7, switcher)
    x = np.random.default_rng(threads).standard_normal(3 * threads).astype(np.float32)
    sums = emu.selftest.block_sum(x, threads)
    np.testing.assert_allclose(sums, x.reshape(3, threads).sum(axis=1), rtol=1e-5, atol=1e-5)
    stats = emu.last_launch_stats()
    assert stats["blocks"] == 3
    assert stats["barriers"] == 3 * threads
    assert stats["warp_syncs"] > 0


@pytest.mark.parametrize("order", ORDERS)
def test_barrier_makes_neighbours_visible(order):
    emu.set_schedule(order, 3)
    x = np.arange(256, dtype=np.float32)
    expected = np.concatenate([np.roll(x[:128], -1), np.roll(x[128:], -1)])
    np.testing.assert_array_equal(emu.selftest.neighbours(x, 128, True), expected)


def test_missing_barrier_is_caught_in_every_order():
    x = np.arange(256, dtype=np.float32)
    expected = np.concatenate([np.roll(x[:128], -1), np.roll(x[128:], -1)])
    for order in ORDERS:
        emu.set_schedule(order, 11)
        got = emu.selftest.neighbours(x, 128, False)
        assert not np.array_equal(got, expected), order
        assert np.isnan(got).any(), order  # it read shared memory no thread had written


def test_warps_with_different_numbers_of_shuffles():
    for order in ORDERS:
        emu.set_schedule(order, 5)
        out = emu.selftest.uneven_shuffles(2, 128).reshape(2, 4, 32)
        # warp w rotated its lanes w + 1 times; the ballot adds 1
        expected = (np.arange(32)[None, :] + np.arange(1, 5)[:, None]) % 32 + 1
        np.testing.assert_array_equal(out[0], expected)
        np.testing.assert_array_equal(out[1], expected)


def test_shared_memory_is_poisoned_per_block():
    assert np.isnan(emu.selftest.read_unwritten(64)).all()


def test_atomics_count_every_thread():
    assert emu.selftest.count_threads(7, 96) == 7 * 96


@pytest.mark.parametrize(
    "name, message",
    [
        ("deadlock", "deadlock"),
        ("early_exit", "__syncthreads"),
        ("partial_mask", "mask"),
        ("oversized_shared", "shared memory"),
    ],
)
def test_rule_breaking_kernels_raise(name, message):
    with pytest.raises(emu.EmulationError, match=message):
        emu.selftest.run_faulty(name)
    # the layer is usable again afterwards
    x = np.ones(64, dtype=np.float32)
    assert emu.selftest.block_sum(x, 64)[0] == 64


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="order"):
        emu.set_schedule("sideways")
    with pytest.raises(ValueError, match="switcher"):
        emu.set_schedule("forward", 0, "threads")
