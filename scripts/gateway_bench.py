"""The gateway's cost: ``python scripts/gateway_bench.py [options]`` is
``tfpool bench --scenario mlp-gateway [options]``: TF Serving gRPC ``Predict`` from 64
concurrent calls through a ``tfpool gateway`` process, beside the direct client on the
same model and settings (``mlp-closed-64``) in the same run.

    python scripts/gateway_bench.py --runs 1

See ``workers/bench/gateway.py`` for how the calls are made.
"""

from __future__ import annotations

import sys

from workers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--scenario", "mlp-gateway", *sys.argv[1:]]))
