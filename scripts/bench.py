"""The benchmark: ``python scripts/bench.py [options]`` is ``tfpool bench [options]``.

    python scripts/bench.py                              # every scenario, median of 3 runs
    python scripts/bench.py --scenario mlp-closed --runs 1 --json bench-mlp.json

See ``workers/bench/__init__.py`` for what each figure means.
"""

from __future__ import annotations

import sys

from workers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
