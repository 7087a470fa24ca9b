"""Run the stores' differential check longer than the test suite does.

Every run plays one random verb sequence on the memory, SQLite and Redis stores
(FCALL and EVALSHA) and fails on the first difference in outcomes, state or events.

Run: ``python scripts/differential.py --runs 2000 --steps 120`` (Redis from
``TBC_REDIS_URL``, or a ``redis-server`` on the PATH).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_differential import compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=None, help="first seed (random if unset)")
    args = parser.parse_args(argv)
    first = args.seed if args.seed is not None else random.randrange(2**32)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(first, first + args.runs):
            compare(seed, args.steps, Path(tmp))
    took = time.monotonic() - started
    print(
        f"{args.runs} runs of {args.steps} verbs (seeds {first}..{first + args.runs - 1}): "
        f"every store agreed ({took:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
