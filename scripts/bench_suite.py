"""Run `lookahead bench` on several datasets with one loaded model (one load, one engine build per process).

    python scripts/bench_suite.py --data-dir DIR --prefix OUT/name -- BENCH ARGS...

runs `lookahead bench BENCH ARGS --dataset D --data-file DIR/FILE --out OUT/name_D.json --plot OUT/name_D.png`
for D in humaneval, gsm8k, mtbench (--datasets to choose). The model options (--model, --device, --dtype) are
read from BENCH ARGS.
"""

import argparse
import sys

from lookahead_decoding.bench.cli import main as bench_main
from lookahead_decoding.cli.common import load_from_args

FILES = {"humaneval": "HumanEval.jsonl.gz", "gsm8k": "test.jsonl", "mtbench": "question.jsonl"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--prefix", required=True, help="output path prefix of the JSON and PNG files")
    parser.add_argument("--datasets", default="humaneval,gsm8k,mtbench")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    model_parser = argparse.ArgumentParser(add_help=False)
    for option in ("--model", "--device", "--dtype"):
        model_parser.add_argument(option)
    model_args, _ = model_parser.parse_known_args(bench_args)
    model_args.device = model_args.device or "auto"
    model_args.dtype = model_args.dtype or "float32"
    model, tokenizer = load_from_args(model_args)
    for dataset in args.datasets.split(","):
        print(f"\n## {dataset}", flush=True)
        code = bench_main([*bench_args, "--dataset", dataset, "--data-file", f"{args.data_dir}/{FILES[dataset]}",
                           "--out", f"{args.prefix}_{dataset}.json", "--plot", f"{args.prefix}_{dataset}.png"],
                          model=model, tokenizer=tokenizer)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
