"""Quick side-by-side of sampled and greedy decoding on one engine (batch 1 and a batch), for a first look at the
cost of sampling on the device: tokens/s, tokens/step and rows identical to plain sampling with the same seeds.

    python scripts/sampling_check.py --model M.gguf --data-dir DIR --device cuda --dtype bfloat16
"""

import argparse
import time

import torch

import lookahead_decoding as ld
from lookahead_decoding.bench.data import load_prompts
from lookahead_decoding.bench.runner import encode_all
from lookahead_decoding.config import AUTOREGRESSIVE
from lookahead_decoding.models import load_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--data-dir", required=True)
parser.add_argument("--device", default="cuda")
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--prompts", type=int, default=8)
parser.add_argument("--batch-sizes", default="1,8")
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

model, tokenizer = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
files = {"humaneval": "HumanEval.jsonl.gz", "mtbench": "question.jsonl", "gsm8k": "test.jsonl"}
SAMPLE = dict(do_sample=True, temperature=0.7, top_p=0.9)


def timed(call):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


for dataset, name in files.items():
    prompts = load_prompts(dataset, f"{args.data_dir}/{name}", args.prompts)
    ids = [e.input_ids[0].tolist() for e in encode_all(tokenizer, prompts, args.device)]
    seeds = list(range(len(ids)))
    for batch in map(int, args.batch_sizes.split(",")):
        row = {}
        for label, config, kwargs in (("ar greedy", AUTOREGRESSIVE, {}), ("la greedy", "auto", {}),
                                      ("ar sample", AUTOREGRESSIVE, dict(SAMPLE, seed=seeds)),
                                      ("la sample", "auto", dict(SAMPLE, seed=seeds))):
            call = lambda: ld.generate(model, ids, args.max_new_tokens, config, batch_size=batch, **kwargs)  # noqa
            call()  # warm-up: engines, captures, calibration
            out, seconds = timed(call)
            row[label] = out
            print(f"{dataset} b{batch} {label}: {out.stats.new_tokens / seconds:8.1f} tok/s "
                  f"{out.stats.tokens_per_step:.2f} tok/step", flush=True)
        same = sum(a.tokens == b.tokens for a, b in zip(row["ar sample"].rows, row["la sample"].rows))
        print(f"{dataset} b{batch}: sampled lookahead rows identical to plain sampling: {same}/{len(ids)}")
        if batch == 1:
            hf_rows = 0
            start = time.perf_counter()
            for prompt in ids[:4]:
                x = torch.tensor([prompt], device=args.device)
                hf_rows += model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                          pad_token_id=tokenizer.eos_token_id, **SAMPLE).shape[1] - len(prompt)
            torch.cuda.synchronize()
            print(f"{dataset} HF sample (4 prompts): {hf_rows / (time.perf_counter() - start):.1f} tok/s")
