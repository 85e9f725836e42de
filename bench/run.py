"""Benchmark suite entry point: the same as `python -m sparse_attn.bench` (see --help)."""

import sys

from sparse_attn.bench import main

sys.exit(main())
