"""Host work per row and step: the project's Python outside the device-side modules, under cProfile.

A batch of `--batch-size` HumanEval prompts decodes with one step shape on every step on a 2-layer random Llama
with SmolLM2's vocabulary, so the forward is cheap and the drafting sees real token streams. `--shape host` (the
default): W=5 N=4 G=5 K=12 B=15 with the default sources, drafted on the host (what `auto` runs on a CPU);
`device`: a tree of 15 nodes, K=12, drafted on the device (what `auto` runs on CUDA besides plain steps); `plain`:
one token per step. Reported: the summed own time (cProfile tottime) of every function in lookahead_decoding except
the device-side modules (engine, device_drafts, layout, attention, kv_cache, verification, sampling), per row and
step, and the largest contributors: over the whole run, and over its second half alone (the difference from a run
of half the tokens on a fresh model of the same weights, which decodes alike up to its end), which leaves out what
a run pays once, the admission of its prompts. cProfile inflates Python time: compare runs of this script only.

    python scripts/host_profile.py --data-file HumanEval.jsonl.gz --batch-size 16 [--shape device]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
import transformers

import lookahead_decoding as ld
from lookahead_decoding.bench.data import load_prompts
from lookahead_decoding.config import AUTOREGRESSIVE

SHAPES = {
    "host": ld.LookaheadConfig(window=5, ngram=4, guesses=5, candidate_length=12, tree_nodes=15),
    "device": ld.LookaheadConfig(window=1, ngram=2, guesses=0, candidate_length=12, tree_nodes=15, device_drafts=True),
    "plain": AUTOREGRESSIVE,
}
DEVICE_SIDE = ("engine.py", "device_drafts.py", "layout.py", "attention.py", "kv_cache.py", "verification.py", "sampling.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-file", required=True, help="a local HumanEval.jsonl.gz")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--top", type=int, default=12, help="how many of the largest contributors to list")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="host", help="the step shape of every step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gguf = ld.default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    texts = [prompt.text for prompt in load_prompts("humaneval", args.data_file, args.batch_size)]
    prompts = [tokenizer(text).input_ids for text in texts]
    shape = SHAPES[args.shape]
    short = profiled_run(len(tokenizer), prompts, shape, args.max_new_tokens // 2)
    whole = profiled_run(len(tokenizer), prompts, shape, args.max_new_tokens)
    for label, (steps, own), (before_steps, before) in (("the whole run", whole, (0, {})),
                                                        ("its second half", whole, short)):
        row_steps = (steps - before_steps) * len(prompts)
        spent = {name: seconds - before.get(name, 0.0) for name, seconds in own.items()}
        per_row_step = sum(spent.values()) / row_steps * 1e6
        print(f"{label}, {steps - before_steps} steps of {len(prompts)} rows: {per_row_step:.1f} us of project host "
              "Python per row and step (under cProfile)")
        for name, seconds in sorted(spent.items(), key=lambda item: -item[1])[:args.top]:
            print(f"  {seconds / row_steps * 1e6:7.1f} us  {name}")


def profiled_run(vocab_size: int, prompts: list[list[int]], shape, max_new_tokens: int) -> tuple[int, dict[str, float]]:
    """(steps, own seconds of each project host function) of one batch on a fresh model of fixed weights: two runs
    of different lengths decode alike up to the shorter's end, so their difference is the longer's last steps."""
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    ld.generate(model, prompts[:2], max_new_tokens=4, config=shape, batch_size=2)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    out = ld.generate(model, prompts, max_new_tokens=max_new_tokens, config=shape, batch_size=len(prompts))
    profiler.disable()
    own: dict[str, float] = {}
    for (path, _, name), stats in pstats.Stats(profiler).stats.items():
        if "lookahead_decoding" in path and not path.endswith(DEVICE_SIDE):
            label = f"{path.split('lookahead_decoding/')[-1]}:{name}"
            own[label] = own.get(label, 0.0) + stats[2]
    return out.stats.steps, own


if __name__ == "__main__":
    main()
