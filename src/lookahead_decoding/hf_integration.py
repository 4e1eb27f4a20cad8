"""Lookahead decoding as a transformers `custom_generate` decoding loop.

    model.generate(input_ids, custom_generate=lookahead_generate, lookahead_config=LookaheadConfig(...))

transformers prepares the generation config, logits processors and stopping criteria (max length, EOS, stop
strings) and streams the prompt, then hands the loop to this function.
"""

from __future__ import annotations

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .config import LookaheadConfig
from .decoding import decode
from .sampling import ProcessedGreedyVerifier, SamplingVerifier, seeded_generator


def lookahead_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    lookahead_config: LookaheadConfig | None = None,
    **model_kwargs,
):
    """Decoding loop for `model.generate(custom_generate=lookahead_generate)`: greedy or sampling.

    `logits_processor` is transformers' own list (with the temperature/top-k/top-p warpers when sampling), applied
    at every verified position; sampling draws from a generator seeded by torch's global RNG.
    """
    if generation_config.do_sample:
        verifier = SamplingVerifier(seeded_generator(model.device), logits_processor=logits_processor)
    else:
        verifier = ProcessedGreedyVerifier(logits_processor) if len(logits_processor) > 0 else None
    if model_kwargs.get("attention_mask") is not None and not bool(model_kwargs["attention_mask"].all()):
        raise ValueError("lookahead decoding does not support padded inputs (the attention mask has zeros)")
    config = lookahead_config if lookahead_config is not None else LookaheadConfig()
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    out = decode(
        model,
        input_ids,
        max_new_tokens,
        config,
        streamer=streamer,
        stopping_criteria=stopping_criteria,
        eos_token_id=generation_config.eos_token_id,
        stream_prompt=False,  # transformers already streamed it
        verifier=verifier,
    )
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=out.sequences)
    return out.sequences
