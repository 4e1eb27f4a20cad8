"""Host cost of the draft memory, on real token streams (the embedded model's tokenizer; HumanEval prompts with
their canonical solutions, and MT-Bench first turns through the chat template).

The memory takes --requests texts (cycling through the data, so that it evicts), then per call, each the fastest
of 5 repeats so that a busy machine's preemptions do not count: `MemorySource.propose` for held-out texts and for
texts the memory holds (repeats), and `SuffixSource.propose` over a text's own tokens for comparison, all at every
third position with max_length 12 and a budget of 60. Also: `DraftMemory.add` per request with Python's cyclic
garbage collector off and on, and a full collection without and with the memory.

    python scripts/memory_cost.py --data-dir DIR [--size 256] [--requests 360]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import transformers

import lookahead_decoding as ld
from lookahead_decoding.bench.memory import FILES, load_conversations
from lookahead_decoding.drafting import MemorySource, SuffixSource
from lookahead_decoding.jsonl import read_objects

REPEATS = 5


def full_collection_ms() -> float:
    """One full run of Python's cyclic garbage collector, the fastest of three."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def propose_cost(make_source, texts, label: str) -> None:
    """Microseconds per propose call at every third position of `texts`, each the fastest of REPEATS."""
    times, drafted = [], 0
    for text in texts:
        source = make_source(text)
        for end in range(8, len(text), 3):
            history, best = text[:end], float("inf")
            for _ in range(REPEATS):
                start = time.perf_counter_ns()
                drafts = source.propose(history, 12, 60)
                best = min(best, (time.perf_counter_ns() - start) / 1e3)
            times.append(best)
            drafted += bool(drafts)
    times.sort()
    print(f"{label}: {len(times)} calls, mean {statistics.mean(times):.1f} us, p50 {times[len(times) // 2]:.1f}, "
          f"p90 {times[int(0.9 * len(times))]:.1f}, p99 {times[int(0.99 * len(times))]:.1f}, max {times[-1]:.0f}; "
          f"{drafted / len(times):.0%} of calls draft")


def own_text_source(text) -> SuffixSource:
    source = SuffixSource()
    source.begin(text)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--size", type=int, default=256, help="the memory's max_requests")
    parser.add_argument("--requests", type=int, default=360, help="texts added before measuring")
    args = parser.parse_args()
    gguf = ld.default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    code = [tokenizer(record["prompt"] + record["canonical_solution"]).input_ids
            for _, record in read_objects(f"{args.data_dir}/{FILES['humaneval']}")]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True)["input_ids"]
             for first, _ in load_conversations(f"{args.data_dir}/{FILES['mtbench']}", 80)]
    held, held_out = code[:120] + chats[:60], code[120:] + chats[60:]
    added = [held[i % len(held)] for i in range(args.requests)]
    without_memory = full_collection_ms()
    for collecting in (False, True):
        (gc.enable if collecting else gc.disable)()
        memory = ld.DraftMemory(max_requests=args.size)
        start = time.process_time()
        for text in added:
            memory.add(text)
        seconds = time.process_time() - start
        tokens = sum(map(len, added))
        print(f"add, collector {'on' if collecting else 'off'}: {seconds / len(added) * 1e3:.2f} ms per request of "
              f"{tokens / len(added):.0f} tokens ({seconds / tokens * 1e6:.1f} us per token)")
    print(f"a full garbage collection: {without_memory:.1f} ms before, {full_collection_ms():.1f} ms with the memory")
    print(f"memory: {len(memory)} requests, {memory.tokens} tokens held, {memory.indexed_tokens} indexed")
    propose_cost(lambda text: MemorySource(memory), held_out, "MemorySource.propose, texts not held")
    propose_cost(lambda text: MemorySource(memory), code[100:120], "MemorySource.propose, texts held (repeats)")
    propose_cost(own_text_source, held_out, "SuffixSource.propose, the text's own tokens")


if __name__ == "__main__":
    main()
