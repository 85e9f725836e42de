#!/usr/bin/env bash
# CI: build sparse_attn with AddressSanitizer + UndefinedBehaviorSanitizer (the CMake option
# SPARSE_ATTN_SANITIZE, at -O1 -g) into its own virtual environment and run a fast subset of the
# tests under it: bad input, the kernels against the reference (fuzzed), threads and Ctrl-C.
# Needs gcc/g++ (their libasan and libstdc++ are preloaded into Python). About 3 minutes on
# 2 cores from scratch; the build is incremental when SPARSE_ATTN_ASAN_BUILD is kept.
#
#   SPARSE_ATTN_ASAN_VENV   the virtual environment (default: a fresh one in a temp folder)
#   SPARSE_ATTN_ASAN_BUILD  the CMake build folder (default: a fresh one in a temp folder)
#   SPARSE_ATTN_ASAN_SYSTEM_PACKAGES=1  let the venv see the system's numpy, pytest, ...
#                                       (offline machines; otherwise they are pip-installed)
set -euo pipefail
cd "$(dirname "$0")/.."

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT  # the default venv and build folder live there
venv="${SPARSE_ATTN_ASAN_VENV:-$scratch/venv-asan}"
build="${SPARSE_ATTN_ASAN_BUILD:-$scratch/build-asan}"

if [[ ! -x "$venv/bin/python" ]]; then
  if [[ "${SPARSE_ATTN_ASAN_SYSTEM_PACKAGES:-0}" == 1 ]]; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" \
      numpy pytest hypothesis scipy threadpoolctl
  fi
fi

# -O1: what the sanitizers recommend, and a build twice as quick as -O3.
SPARSE_ATTN_SANITIZE=ON "$venv/bin/python" -m pip install --quiet --no-build-isolation \
  --force-reinstall --no-deps -Cbuild-dir="$build" -Ccmake.build-type=Debug \
  "-Ccmake.define.CMAKE_CXX_FLAGS_DEBUG=-O1 -g" .

# The extension is sanitized but python is not: the ASan runtime must come first (LD_PRELOAD),
# and libstdc++ with it, or ASan's __cxa_throw interceptor finds nothing to forward to and the
# first C++ exception (a ValueError from the core) aborts the process.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
export LD_PRELOAD
# Python itself leaks by design at exit: no leak report for the interpreter (tests/test_leaks.py
# checks the library's memory). Stop at the first report of either sanitizer.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export OMP_WAIT_POLICY=PASSIVE

core="$("$venv/bin/python" -c "import sparse_attn._core as c; print(c.__file__)")"
if [[ "$(ldd "$core")" != *libasan* ]]; then  # (not grep -q: ldd would die of SIGPIPE)
  echo "sanitize.sh: $core is not linked with AddressSanitizer" >&2
  exit 1
fi
echo "sanitized build: $core"
# --capture=sys: a sanitizer report goes to the real stderr even when it ends the process.
"$venv/bin/python" -m pytest -q -p no:cacheprovider --capture=sys \
  tests/test_bad_input.py tests/test_errors.py tests/test_fuzz.py tests/test_threads.py \
  tests/test_huge.py tests/test_attention.py::test_random_case \
  tests/test_variants.py::test_random_variant "$@"
