"""How often a drafted node of each rank is accepted when its parent is: the numbers behind the template's prior
(`device_drafts.RANK_ACCEPTANCE`), measured on steps that draft on the device; and the same for the copying
chain and, with a window, the pool's chains.

The embedded model decodes a few prompts of each dataset (greedy, or sampled with --temperature; one at a time, on
one static engine per dataset, which keeps its tables across prompts) with one device-drafting shape; after every step, each template node whose
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
from lookahead_decoding.device_drafts import COPY, POOL, TOP_K, TemplateShape, draft_template
from lookahead_decoding.engine import StaticStep

FILES = {"humaneval": "HumanEval.jsonl.gz", "gsm8k": "test.jsonl", "mtbench": "question.jsonl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a folder with " + ", ".join(FILES.values()))
    parser.add_argument("--prompts", type=int, default=3, help="prompts per dataset")
    parser.add_argument("--offset", type=int, default=0, help="skip this many prompts of each dataset first")
    parser.add_argument("--tree-nodes", type=int, default=120)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--window", type=int, default=1, help="the device's Jacobi window (1: none)")
    parser.add_argument("--ngram", type=int, default=2)
    parser.add_argument("--guesses", type=int, default=1, help="the pool's n-grams verified per step")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature, prompt i with seed i (0: greedy)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = ld.load_default_model()
    shape = ld.LookaheadConfig(args.window, args.ngram, args.guesses, candidate_length=args.depth,
                               tree_nodes=args.tree_nodes, device_drafts=True)
    template = draft_template(*TemplateShape.of(shape))
    tested: collections.Counter = collections.Counter()  # (depth, rank) -> nodes whose parent was accepted
    accepted: collections.Counter = collections.Counter()
    for dataset, name in FILES.items():
        prompts = load_prompts(dataset, f"{args.data_dir}/{name}", args.offset + args.prompts)[args.offset:]
        runner = StaticStep(model, shape, 1024, sampling=args.temperature > 0)
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
        for index, encoded in enumerate(encode_all(tokenizer, prompts, "cpu")):
            sampling = dict(do_sample=True, temperature=args.temperature, seed=index) if args.temperature else {}
            stats = ld.generate(model, encoded.input_ids, args.max_new_tokens, shape, runner=runner, **sampling).stats
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
    for name, rank in (("the copying chain", COPY), ("the pool's chains", POOL)):
        print(f"{name} by depth: tested, accepted, share")
        for depth in range(1, args.depth + 1):
            if tested[depth, rank]:
                print(f"{depth}: {tested[depth, rank]} {accepted[depth, rank]} "
                      f"{accepted[depth, rank] / tested[depth, rank]:.3f}")


if __name__ == "__main__":
    main()
