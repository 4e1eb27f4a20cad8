"""`lookahead tune`: run the calibration behind config="auto" now, print what it measured and store the plan.

With --random-shape it measures the step shapes of a randomly initialised model of a named size instead (say a
Llama-3-8B shape on a GPU), which needs no weights: step costs depend on the shape, not on the values. Such a
plan is printed but not cached.
"""

from __future__ import annotations

import argparse
import json

from .common import CommandError, add_model_arguments, check_writable, load_from_args

# Named model shapes (public architecture hyper-parameters) for --random-shape.
RANDOM_SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "qwen-2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                         num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768,
                         rope_theta=1000000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
}


def add_tune_command(commands) -> None:
    parser = commands.add_parser(
        "tune", help="calibrate the step shapes of config='auto' for this device, model and dtype",
        description="Time every candidate step shape on the runner decoding uses, choose the plan (plain, narrow "
        "and wide steps) that config='auto' uses, store it in the calibration cache and print the table.",
    )
    add_model_arguments(parser)
    parser.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES),
                        help="measure a randomly initialised model of this shape instead of --model (not cached)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of step cost against tokens per step")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run_tune)


def random_model(name: str, device: str, dtype: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..models import resolve_device, resolve_dtype

    config = LlamaConfig(**RANDOM_SHAPES[name], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(resolve_device(device)):
        return LlamaForCausalLM(config).to(resolve_dtype(dtype)).eval()


def run_tune(args: argparse.Namespace) -> int:
    if args.random_shape and args.model is not None:
        raise CommandError("--random-shape builds a model of random weights: it cannot take --model too")
    if args.plot:
        check_writable("--plot", args.plot)
    from ..runners import calibrate_model, uses_static_engine
    from ..shape_choice import expected_tokens
    from ..plan_cache import calibration_key, store_plan
    from ..tuning import shape_name

    model = random_model(args.random_shape, args.device, args.dtype) if args.random_shape else load_from_args(args)[0]
    static = uses_static_engine(model)
    calibration = calibrate_model(model, static, exhaustive=True)  # the whole table, not just the plan
    if not args.random_shape:
        store_plan(calibration_key(model, "static" if static else "dynamic"), calibration.plan)
    plain_cost = calibration.measured[0][1]
    rows = [{"shape": shape_name(shape), "tokens_per_step": shape.tokens_per_step, "cost_ms": cost,
             "cost_vs_plain": cost / plain_cost, "chosen": shape in calibration.plan.shapes,
             "expected_tokens_prior": expected_tokens(shape) if shape.has_window else None}
            for shape, cost in calibration.measured]
    result = {"model": args.random_shape or args.model or "default", "device": str(model.device),
              "dtype": str(model.dtype).removeprefix("torch."), "engine": "static" if static else "dynamic",
              "measured": rows, "plan": calibration.plan.describe()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"calibration of {result['model']} on {result['device']} ({result['dtype']}, {result['engine']} engine)")
        print("| step shape | tokens in the step | ms per step | vs plain | in the plan |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['shape']} | {row['tokens_per_step']} | {row['cost_ms']:.2f} | {row['cost_vs_plain']:.2f}x | "
                  f"{'yes' if row['chosen'] else ''} |")
        print(f"plan: {result['plan']}")
    if args.plot:
        plot_costs(rows, args.plot, result)
        print(f"plot: {args.plot}")
    return 0


def plot_costs(rows: list[dict], path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for row in rows:
        axes.scatter(row["tokens_per_step"], row["cost_vs_plain"], color="C1" if row["chosen"] else "C0")
        axes.annotate(row["shape"].replace("lookahead ", ""), (row["tokens_per_step"], row["cost_vs_plain"]),
                      fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("symlog")
    axes.set_xlabel("tokens in one step")
    axes.set_ylabel("step cost / plain one-token step")
    axes.set_title(f"{result['model']} on {result['device']}, {result['dtype']} (orange: the plan)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
