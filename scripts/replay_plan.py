"""The shape choice of another device, replayed here: a step plan with that device's step costs, held fixed.

Which shapes the loop chooses depends on the plan's costs and on what the drafts yield, not on how fast this
machine runs the steps. This script decodes the embedded model (float32) with a given plan whose costs are taken
as measured, never re-measured (in batches the scheduler would otherwise time the steps on this machine), and
reports the steps of each shape, tokens per step, and the time those steps would take at the given costs
(device steps only, and with --prefill-ms the prefills that started rows: a projection, not a measurement of the
other device). It decodes greedily, on the engine `ld.generate` would use, so a batch's refills may ride in its
steps (`carried_prompts`). E.g. the H200's batch-1 plan:

    python scripts/replay_plan.py --data-file HumanEval.jsonl.gz --limit 6 --max-new-tokens 160 \\
        --shapes plain:3.35,20:7:20:12:120:5.40
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

import lookahead_decoding as ld
from lookahead_decoding.bench.data import DATASETS, load_prompts
from lookahead_decoding.bench.runner import encode_all
from lookahead_decoding.config import AUTOREGRESSIVE, LookaheadConfig
from lookahead_decoding.decoding import eos_set, make_sources
from lookahead_decoding.runners import runner_for
from lookahead_decoding.sampling_params import finite_real
from lookahead_decoding.scheduler import BatchScheduler, Request
from lookahead_decoding.tuning import StepPlan, shape_name


def parse_plan(text: str) -> StepPlan:
    """`plain:MS,W:N:G:K:B:MS,device:B:K:MS,...` -> the plan, cheapest first as given (`device`: a step that drafts
    B nodes K deep on the device)."""
    shapes, costs = [], []
    for item in text.split(","):
        *fields, cost = item.split(":")
        try:
            if fields[0] == "device":
                shapes.append(LookaheadConfig(1, 2, 1, candidate_length=int(fields[2]), tree_nodes=int(fields[1]),
                                              device_drafts=True))
            else:
                shapes.append(AUTOREGRESSIVE if fields == ["plain"] else LookaheadConfig(
                    *map(int, fields[:3]), candidate_length=int(fields[3]), tree_nodes=int(fields[4])))
            costs.append(float(cost))
            if len(fields) not in (1, 3, 5) or not costs[-1] > 0:
                raise ValueError
        except (ValueError, TypeError, IndexError):
            raise argparse.ArgumentTypeError(f"{item!r} is none of plain:MS, W:N:G:K:B:MS and device:B:K:MS with a cost MS > 0")
    return StepPlan(tuple(shapes), tuple(costs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="humaneval", choices=list(DATASETS))
    parser.add_argument("--data-file", required=True)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--shapes", required=True, type=parse_plan,
                        help="plain:MS,W:N:G:K:B:MS,device:B:K:MS,... (a step's cost in ms)")
    parser.add_argument("--model", help="a local model folder or .gguf file (default: the embedded model)")
    parser.add_argument("--draft-memory", type=int, default=0, help="requests a DraftMemory holds (0: none)")
    parser.add_argument("--prefill-ms", type=float, default=0.0,
                        help="what one prefill that starts rows costs there, added to the projection (default 0)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not finite_real(args.prefill_ms) or args.prefill_ms < 0:
        parser.error(f"--prefill-ms must be a finite number >= 0, got {args.prefill_ms}")
    torch.set_num_threads(args.threads)
    plan = args.shapes
    model, tokenizer = ld.load_default_model(path=args.model)
    prompts = encode_all(tokenizer, load_prompts(args.dataset, args.data_file, args.limit), "cpu")
    longest = max(p.input_ids.shape[1] for p in prompts) + args.max_new_tokens
    memory = ld.DraftMemory(args.draft_memory) if args.draft_memory else None
    # A greedy engine, as `ld.generate` decodes a batch (a server's samples; its steps carry no prompts).
    runner = runner_for(model, plan.shapes, longest, batch_size=args.batch_size)
    scheduler = BatchScheduler(runner, plan, make_sources(None, plan.shapes, None, args.batch_size), memory)
    for costs in scheduler.step_costs.values():  # the given costs stand for the other device's
        costs.measured = False
    for index, prompt in enumerate(prompts):
        scheduler.submit(Request(prompt.input_ids[0].tolist(), args.max_new_tokens, eos_set(model), tag=index))
    finished = list(scheduler.run())
    steps = Counter(scheduler.steps_by_shape)
    cost = dict(zip(map(shape_name, plan.shapes), plan.costs_ms))
    row_steps = sum(result.stats.steps for result in finished)
    print(json.dumps({"plan": plan.describe(), "batched_steps_by_shape": dict(steps),
                      "tokens": scheduler.stats.new_tokens,
                      "tokens_per_step_per_row": scheduler.stats.new_tokens / max(row_steps, 1),
                      "prefills": scheduler.stats.prefills,
                      "carried_prompts": scheduler.stats.carried_prompts,
                      "projected_device_ms": sum(n * cost[shape] for shape, n in steps.items())
                      + scheduler.stats.prefills * args.prefill_ms}, indent=1))


if __name__ == "__main__":
    main()
