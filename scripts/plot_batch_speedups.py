"""Plot the batched bench's speedup against batch size for several runs (one dataset each) in one figure: a line
per dataset.

    python scripts/plot_batch_speedups.py OUT.png RESULTS.json [RESULTS.json ...]

The runs are the JSON of `lookahead bench --batch-size ...` (or of scripts/bench_suite.py with --batch-size among the
bench arguments); the subtitle names the first run's model and device.
"""

import argparse
import json

from lookahead_decoding.bench.report import plot_batched


def read_batched(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        try:
            result = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    if "batched" not in result:
        raise ValueError(f"{path}: not a batched bench result (no 'batched' records); run lookahead bench with "
                         "--batch-size")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+", metavar="RESULTS.json")
    args = parser.parse_args()
    try:
        results = [read_batched(path) for path in args.runs]
    except (OSError, ValueError) as err:
        parser.error(str(err))
    plot_batched({**results[0], "batched": [record for result in results for record in result["batched"]]}, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
