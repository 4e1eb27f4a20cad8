"""A bulk run with the draft memory on and off (HumanEval, then MT-Bench first and second turns): tokens per step
per request, as JSON and a plot. `python scripts/bench_memory.py --help` says more.

    python scripts/bench_memory.py --data-dir DIR --out memory.json --plot memory.png [--limit K] [--model ...]
"""

import sys

from lookahead_decoding.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
