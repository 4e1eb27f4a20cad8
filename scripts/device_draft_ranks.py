"""How often a drafted node of each rank is accepted when its parent is: the numbers behind the template's prior
(`device_drafts.RANK_ACCEPTANCE`), measured on steps that draft on the device.

The embedded model decodes a few prompts of each dataset (greedy, one at a time, on one static engine per dataset,
which keeps its tables across prompts) with one device-drafting shape; after every step, each template node whose
parent was accepted (or that hangs from the current token) counts as tested, and as accepted if it is on the
accepted path. Printed: tokens per step per dataset, then per rank over all depths, then rank 0 per depth.

    python scripts/device_draft_ranks.py --data-dir ../shared/data --prompts 3 --offset 20
"""

from __future__ import annotations

import argparse
import collections

import torch

import lookahead_decoding as ld
from lookahead_decoding.bench.data import load_prompts
from lookahead_decoding.bench.runner import encode_all
from lookahead_decoding.device_drafts import TOP_K, draft_template
from lookahead_decoding.engine import StaticStep

FILES = {"humaneval": "HumanEval.jsonl.gz", "gsm8k": "test.jsonl", "mtbench": "question.jsonl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a folder with " + ", ".join(FILES.values()))
    parser.add_argument("--prompts", type=int, default=3, help="prompts per dataset")
    parser.add_argument("--offset", type=int, default=0, help="skip this many prompts of each dataset first")
    parser.add_argument("--tree-nodes", type=int, default=120)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = ld.load_default_model()
    shape = ld.LookaheadConfig(1, 2, 1, candidate_length=args.depth, tree_nodes=args.tree_nodes, device_drafts=True)
    template = draft_template(args.tree_nodes, args.depth)
    tested: collections.Counter = collections.Counter()  # (depth, rank) -> nodes whose parent was accepted
    accepted: collections.Counter = collections.Counter()
    for dataset, name in FILES.items():
        prompts = load_prompts(dataset, f"{args.data_dir}/{name}", args.offset + args.prompts)[args.offset:]
        runner = StaticStep(model, shape, 1024)
        finish = runner.finish_rows

        def counting(launched):
            outcomes = finish(launched)
            for outcome in filter(None, outcomes):
                reached, kept = {-1, *outcome.path}, set(outcome.path)
                for node, parent in enumerate(template.parents):
                    if parent in reached:
                        key = (template.depths[node], template.ranks[node])
                        tested[key] += 1
                        accepted[key] += node in kept
            return outcomes

        runner.finish_rows = counting
        steps = tokens = 0
        for encoded in encode_all(tokenizer, prompts, "cpu"):
            stats = ld.generate(model, encoded.input_ids, args.max_new_tokens, shape, runner=runner).stats
            steps, tokens = steps + stats.steps, tokens + stats.new_tokens
        print(f"{dataset}: {tokens / steps:.3f} tokens per step", flush=True)
    print("rank: tested, accepted, accepted share (all depths)")
    for rank in range(TOP_K):
        tried = sum(count for (_, r), count in tested.items() if r == rank)
        kept = sum(count for (_, r), count in accepted.items() if r == rank)
        print(f"{rank}: {tried} {kept} {kept / max(tried, 1):.3f}")
    print("rank 0 by depth: tested, accepted, share")
    for depth in range(1, args.depth + 1):
        print(f"{depth}: {tested[depth, 0]} {accepted[depth, 0]} {accepted[depth, 0] / max(tested[depth, 0], 1):.3f}")


if __name__ == "__main__":
    main()
