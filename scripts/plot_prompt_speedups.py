"""Plot the per-prompt speedup distribution of several bench runs side by side.

    python scripts/plot_prompt_speedups.py OUT.png LABEL=RESULTS.json [LABEL=RESULTS.json ...] [--method NAME]
"""

import argparse
import json

from lookahead_decoding.bench.report import plot_prompt_speedups

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out")
parser.add_argument("runs", nargs="+", metavar="LABEL=RESULTS.json")
parser.add_argument("--method", default="lookahead")
args = parser.parse_args()
runs = {}
for entry in args.runs:
    label, _, path = entry.partition("=")
    with open(path, encoding="utf-8") as handle:
        runs[label.replace("\\n", "\n")] = json.load(handle)
plot_prompt_speedups(runs, args.out, args.method)
print(args.out)
