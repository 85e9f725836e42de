"""The micro-kernels of every SIMD level against the float64 reference.

The library picks its level once per process from SPARSE_ATTN_SIMD (``generic`` forces the
portable path), so each level runs a compact correctness sweep in its own interpreter: every
pattern kind, unions and intersections, float32 and float64, sizes around the vector widths.
"""

from __future__ import annotations

import json

import numpy as np
import sparse_attn as sa
from conftest import expected_simd, merge_worst, run_python

CASES_PER_KIND = 6  # x 8 kinds: float32 and float64 alternate

SWEEP = """
import json
import numpy as np
import sparse_attn as sa
from conftest import (PRIMITIVE_KINDS, WORST, Shapes, random_case, random_pattern,
                      run_and_check)

kinds = PRIMITIVE_KINDS + ("union/intersection",)
checked = 0
for i in range({cases_per_kind} * len(kinds)):
    rng = np.random.default_rng([5150, i])
    kind = kinds[i % len(kinds)]
    dtype = (np.float32, np.float64)[(i // len(kinds)) % 2]
    if kind == "union/intersection":
        case = random_case(rng, dtype=dtype, seed=i)
        case.pattern = random_pattern(rng, case.q.shape[-2], case.k.shape[-2], 3)
    else:
        case = random_case(rng, dtype=dtype, kind=kind, seed=i)
    run_and_check(case)
    checked += 1

# Head dims and lengths around the vector widths (4 doubles, 8 floats) and the 64-wide tile.
for i, (D, L) in enumerate([(1, 1), (3, 7), (7, 8), (8, 9), (9, 15), (15, 16), (16, 17),
                            (17, 63), (31, 65), (33, 127), (64, 129), (65, 3)]):
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng([5151, i])
        case = random_case(rng, dtype=dtype, shapes=Shapes(2, 1, L + 2, L, D, 17 - D % 16,
                                                           (), (), ()),
                           kind=("dense", "causal", "window")[i % 3], seed=("tail", D, L))
        run_and_check(case)
        checked += 1

# The kernels must not switch the process to flush-to-zero (-ffast-math would).
assert np.float32(1e-40) != 0 and np.float32(1e-38) / np.float32(100) != 0, "denormals flushed"
print(json.dumps({{"simd": sa.build_info()["simd"], "checked": checked, "worst": WORST}}))
"""


def run_sweep(level):
    proc = run_python(SWEEP.format(cases_per_kind=CASES_PER_KIND), simd=level)
    assert proc.returncode == 0, (
        f"SPARSE_ATTN_SIMD={level}: the sweep failed\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    merge_worst(report["worst"])
    return report


def test_each_simd_level_matches_the_reference(simd_level):
    report = run_sweep(simd_level)
    assert report["checked"] >= 60
    assert report["simd"] in sa.build_info()["simd_compiled"]
    expected = expected_simd(simd_level)
    if expected is not None:
        assert report["simd"] == expected, (
            f"SPARSE_ATTN_SIMD={simd_level}: build_info() reports {report['simd']!r}"
        )


def test_generic_is_forced_by_the_environment():
    proc = run_python("import sparse_attn as sa; print(sa.build_info()['simd'])", simd="generic")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "generic"


def test_an_unrecognised_level_falls_back_to_the_default():
    """Only ``generic`` forces a level; anything else leaves the library's own choice."""
    default = run_python("import sparse_attn as sa; print(sa.build_info()['simd'])", simd=None)
    other = run_python("import sparse_attn as sa; print(sa.build_info()['simd'])", simd="avx2")
    assert default.returncode == 0 and other.returncode == 0, default.stderr + other.stderr
    assert other.stdout.strip() == default.stdout.strip()


def test_this_process_reports_a_compiled_level():
    info = sa.build_info()
    assert info["simd"] in info["simd_compiled"] and "generic" in info["simd_compiled"]


AGREE = """
import numpy as np, sparse_attn as sa
rng = np.random.default_rng(99)
q, k, v = (rng.standard_normal(s).astype(np.float32)
           for s in ((3, 130, 33), (3, 97, 33), (3, 97, 17)))
out, lse = sa.attention(q, k, v, sa.SlidingWindow(40) | sa.Global([5]), return_lse=True)
np.save({path!r} + "_out.npy", out)
np.save({path!r} + "_lse.npy", lse)
"""


def test_levels_agree_with_each_other(tmp_path):
    """The portable and the default kernels agree within float32 rounding on one problem."""
    results = {}
    for level in ("generic", None):
        path = str(tmp_path / str(level))
        proc = run_python(AGREE.format(path=path), simd=level)
        assert proc.returncode == 0, proc.stderr
        results[level] = np.load(path + "_out.npy"), np.load(path + "_lse.npy")
    (out_a, lse_a), (out_b, lse_b) = results["generic"], results[None]
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse_a, lse_b, rtol=0, atol=1e-5)
