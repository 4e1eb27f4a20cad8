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
    """Decoding loop for `model.generate(custom_generate=lookahead_generate)`; greedy only for now."""
    if generation_config.do_sample or len(logits_processor) > 0:
        raise ValueError(
            "lookahead_generate supports greedy decoding without logits processors only "
            f"(got do_sample={generation_config.do_sample}, {len(logits_processor)} logits processors)"
        )
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
    )
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=out.sequences)
    return out.sequences
