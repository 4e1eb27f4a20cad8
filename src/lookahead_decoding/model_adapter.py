"""Calling any HF decoder-only model through its public forward: explicit positions, a 4D additive mask,
the cache passed under whichever name this transformers version uses, logits only for the rows we need."""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from transformers import DynamicCache

from . import attention as lookahead_attention

# Attention backends that honour an arbitrary 4D mask; flash-attention kernels only know causal/padding masks.
MASKABLE_ATTENTION = ("eager", "sdpa", "flex_attention", lookahead_attention.NAME)


class UnsupportedModelError(ValueError):
    """The model cannot run lookahead decoding (not a decoder-only LM, or no custom-mask attention)."""


def context_length(config) -> int | None:
    """The longest sequence the model's position scheme allows, if its config says."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@functools.lru_cache(maxsize=64)
def forward_parameters(forward) -> frozenset[str]:
    """The names `forward` takes (a model class's forward function, or a model's own forward where it replaced it):
    inspected once per function, not on every call that looks at a model."""
    return frozenset(inspect.signature(forward).parameters)


class ModelAdapter:
    """Everything the decoding loop needs to know about one model."""

    def __init__(self, model) -> None:
        config = getattr(model, "config", None)
        name = type(model).__name__
        if config is None or not callable(getattr(model, "forward", None)):
            raise UnsupportedModelError(f"{name} is not a transformers model (it has no config/forward)")
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"{name} is an encoder-decoder model; lookahead decoding needs a decoder-only causal LM")
        if model.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{name} has no language-modeling head; load it with AutoModelForCausalLM")
        params = forward_parameters(getattr(model.forward, "__func__", model.forward))
        if "position_ids" not in params or "attention_mask" not in params:
            raise UnsupportedModelError(f"{name}.forward takes no explicit position_ids/attention_mask, which lookahead decoding needs")
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in MASKABLE_ATTENTION:
            raise UnsupportedModelError(
                f"{name} uses attn_implementation={attention!r}, which cannot take the custom 4D attention mask of "
                f"lookahead decoding; load the model with attn_implementation='sdpa' or 'eager'"
            )
        if attention == "sdpa":  # the same attention, without copying K and V per query head (attention.py)
            model.set_attn_implementation(lookahead_attention.NAME)
            attention = lookahead_attention.NAME
        text_config = config.get_text_config(decoder=True)
        # Query heads per KV head where our attention folds them into the query rows: its masks are folded here,
        # once per forward, not in every layer (1: masks as they are).
        kv_heads = getattr(text_config, "num_key_value_heads", None)
        heads = getattr(text_config, "num_attention_heads", None)
        self.query_groups = heads // kv_heads if attention == lookahead_attention.NAME and kv_heads and heads else 1
        # Our attention reads only as many cache slots as the mask has columns (`attention.py`); the others need a
        # mask as wide as the cache.
        self.takes_narrow_masks = attention == lookahead_attention.NAME
        # Weak, so that engines cached per model (runners.py) do not keep their model alive.
        self._model = weakref.ref(model)
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params
        self.context_length = context_length(config)
        layer_types = getattr(text_config, "layer_types", None)
        window = getattr(text_config, "sliding_window", None)
        if layer_types is not None:
            # Per-layer-type masks (Gemma 2/3, Qwen 2/3): the model picks one per layer from a dict.
            self.sliding_window = window if "sliding_attention" in layer_types else None
            self.mask_per_layer_type = self.sliding_window is not None
        else:
            # Mistral, Phi-3: when set, the window applies to every layer.
            use_sliding = getattr(text_config, "use_sliding_window", True)
            self.sliding_window = window if use_sliding else None
            self.mask_per_layer_type = False

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise ValueError("the model this step runner was built for no longer exists")
        return model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vocab(self) -> int:
        """The number of logits per position."""
        return self.model.get_output_embeddings().weight.shape[0]

    def new_cache(self) -> DynamicCache:
        # Full-length layers everywhere (no config): sliding windows are applied by our mask instead, so that
        # rolled-back tokens can always be cropped away.
        return DynamicCache()

    def attention_mask(self, allowed: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor):
        """Additive [batch, 1, Q, K] mask(s) from a boolean `allowed` [Q, K] (one sequence) or [batch, Q, K] over
        absolute query/key positions; folded for the query heads that share a KV head (`attention.fold_mask`)
        where the model's attention takes them so."""
        minimum = torch.finfo(self.dtype).min
        full = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, minimum)
        full = full.view(-1, 1, *allowed.shape[-2:])
        if self.sliding_window is None:
            return self._folded(full)
        in_window = (query_pos[..., :, None] - key_pos[..., None, :]) < self.sliding_window
        sliding = full.masked_fill(~in_window.view(-1, 1, *in_window.shape[-2:]), minimum)
        if self.mask_per_layer_type:
            return {"full_attention": self._folded(full), "sliding_attention": self._folded(sliding)}
        return self._folded(sliding)

    def _folded(self, mask: torch.Tensor) -> torch.Tensor:
        """`mask` [batch, 1, Q, K] as the model's attention takes it: folded where it folds query heads (one query
        row broadcasts as it is)."""
        if self.query_groups > 1 and mask.shape[-2] > 1:
            return lookahead_attention.fold_mask(mask, self.query_groups)
        return mask

    def forward(self, input_ids, position_ids, attention_mask, cache, logit_rows=None) -> torch.Tensor:
        """Logits [rows, vocab] for `logit_rows` of one sequence's input [S], or [batch, rows, vocab] of a batch's
        [batch, S] (all rows when None)."""
        kwargs = {self.cache_kwarg: cache, "use_cache": True}
        if logit_rows is not None and self.keeps_logits:
            kwargs["logits_to_keep"] = logit_rows
        one = input_ids.dim() == 1
        out = self.model(
            input_ids=input_ids[None] if one else input_ids, position_ids=position_ids[None] if one else position_ids,
            attention_mask=attention_mask, **kwargs
        )
        logits = out.logits
        if logit_rows is not None and not self.keeps_logits:
            logits = logits[:, logit_rows]
        return logits[0] if one else logits
