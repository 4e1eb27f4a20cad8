"""Run `lookahead bench` on several datasets with one loaded model (one load, one engine build per process).

    python scripts/bench_suite.py --data-dir DIR --prefix OUT/name -- BENCH ARGS...

runs `lookahead bench BENCH ARGS --dataset D --data-file DIR/FILE --out OUT/name_D.json --plot OUT/name_D.png`
for D in humaneval, gsm8k, mtbench (--datasets to choose; `prompts` reads --prompts-file instead, by default the
repository's prompts of other kinds). The model options (--model, --device, --dtype) are read from BENCH ARGS.
"""

import argparse
import sys
from pathlib import Path

from lookahead_decoding.bench.cli import main as bench_main
from lookahead_decoding.cli.common import load_from_args

FILES = {"humaneval": "HumanEval.jsonl.gz", "gsm8k": "test.jsonl", "mtbench": "question.jsonl"}
OTHER_KINDS = Path(__file__).resolve().parent.parent / "prompts" / "other_kinds.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="the folder of the public datasets' upstream files")
    parser.add_argument("--prompts-file", default=str(OTHER_KINDS), help="the file of dataset `prompts`")
    parser.add_argument("--prefix", required=True, help="output path prefix of the JSON and PNG files")
    parser.add_argument("--datasets", default="humaneval,gsm8k,mtbench")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    if args.data_dir is None and set(datasets) & set(FILES):
        parser.error(f"--datasets {args.datasets} needs --data-dir")
    bench_args = [a for a in args.bench_args if a != "--"]
    model_parser = argparse.ArgumentParser(add_help=False)
    for option in ("--model", "--device", "--dtype"):
        model_parser.add_argument(option)
    model_args, _ = model_parser.parse_known_args(bench_args)
    model_args.device = model_args.device or "auto"
    model_args.dtype = model_args.dtype or "float32"
    model, tokenizer = load_from_args(model_args)
    for dataset in datasets:
        print(f"\n## {dataset}", flush=True)
        data_file = args.prompts_file if dataset == "prompts" else f"{args.data_dir}/{FILES[dataset]}"
        code = bench_main([*bench_args, "--dataset", dataset, "--data-file", data_file,
                           "--out", f"{args.prefix}_{dataset}.json", "--plot", f"{args.prefix}_{dataset}.png"],
                          model=model, tokenizer=tokenizer)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
