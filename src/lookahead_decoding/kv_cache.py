"""Keeping exactly the committed tokens' KV after a fused step; the only module that touches caches' internals.

After a step the cache holds each sequence's prefix and all S step rows behind it. The committed tokens are the
current token (step row 0, already in place) and the accepted path's nodes; their KV moves right behind the
current token and everything after it is dropped.

* `commit_path_kv`: transformers' DynamicCache (one sequence), dropped through the cache's own `crop`;
* `RowCache`: a preallocated cache whose rows each hold one sequence of its own length (a batch with ragged
  acceptance), written at the slots the engine gives every forward; `move_kv` commits there. Every layer's keys
  and values are views of one tensor (`LayerStack`), so that a commit is one gather and one scatter for the whole
  model rather than four per layer: at batch 1 a step is launch-bound, and those were 120 kernels of a 30-layer
  model's tree step (docs/benchmarks.md, "Fewer ops in a tree step").

Compiled, the writes are `index_put_` rather than `scatter_`: Inductor writes the first in place, while for the
second it copied the whole cache in every layer (a clone to scatter into, then a copy back), which at batch 64 cost
an H100 1.4 ms of a 3.6 ms compiled plain step (docs/benchmarks.md, "The server with the device's drafts").
Eagerly `scatter_` needs no index tensors built per layer.
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import StaticLayer
from transformers.utils import is_torchdynamo_compiling


def commit_path_kv(cache: Cache, step_size: int, path_rows: torch.Tensor) -> None:
    """path_rows: [m] step rows of the accepted path's nodes, from depth 1 down."""
    accepted = path_rows.numel()
    if accepted > 0:
        for layer in cache.layers:
            step_start = layer.keys.shape[-2] - step_size
            src = path_rows + step_start
            dst = torch.arange(1, accepted + 1, device=src.device) + step_start
            layer.keys.index_copy_(-2, dst, layer.keys.index_select(-2, src))
            layer.values.index_copy_(-2, dst, layer.values.index_select(-2, src))
    cache.crop(-(step_size - 1 - accepted))


class LayerStack:
    """The storage of a model's keys and values: tensors [entries, batch, heads, slots, dim], each entry one layer's
    keys or values. The first shape asked for gets room for all `layers` layers' keys and values (every layer of
    the models served has the same); another shape gets a tensor of its own."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.tensors: list[torch.Tensor] = []
        self._taken: list[int] = []  # entries of each tensor handed out

    def place(self, blank: torch.Tensor) -> torch.Tensor:
        """An entry shaped and typed as `blank` (zeros), a view of one of the stack's tensors."""
        for index, tensor in enumerate(self.tensors):
            if (tensor.shape[1:], tensor.dtype, tensor.device) == (blank.shape, blank.dtype, blank.device) \
                    and self._taken[index] < tensor.shape[0]:
                break
        else:
            entries = 1 if self.tensors else 2 * self.layers
            self.tensors.append(blank.new_zeros(entries, *blank.shape))
            self._taken.append(0)
            index = len(self.tensors) - 1
        self._taken[index] += 1
        return self.tensors[index][self._taken[index] - 1]

    def move(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy each row's entries at slots `sources` [batch, n] to slots `targets` [batch, n], in every entry."""
        for states in self.tensors:
            shape = (*states.shape[:3], sources.shape[1], states.shape[4])
            moved = states.gather(3, sources[None, :, None, :, None].expand(shape))
            states.scatter_(3, targets[None, :, None, :, None].expand(shape), moved)


class RowLayer(StaticLayer):
    """A static layer of `batch_size` rows that writes each row's new keys and values at that row's own slots. A
    forward may also run on some of the rows only (`rows`): it then attends over those rows' keys and values. Its
    keys and values live in `stack`."""

    slots: torch.Tensor  # [inputs, new tokens]: where the next forward's tokens go, per input row
    rows: torch.Tensor | None = None  # [inputs]: the cache row of each input row (None: input row i is row i)

    def __init__(self, max_cache_len: int, batch_size: int, stack: LayerStack) -> None:
        super().__init__(max_cache_len)
        self.batch_size, self.stack = batch_size, stack

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # sizes, device, and blank keys and values
        self.keys, self.values = self.stack.place(self.keys), self.stack.place(self.values)
        if not is_torchdynamo_compiling():  # as transformers marks its own: fixed addresses for compiled steps
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # every row, whichever rows the first forward runs on
            every_row = (self.batch_size, -1, -1, -1)
            self.lazy_initialization(key_states[:1].expand(every_row), value_states[:1].expand(every_row))
        if self.rows is None and not is_torchdynamo_compiling():
            slots = self.slots[:, None, :, None]
            self.keys.scatter_(2, slots.expand_as(key_states), key_states)
            self.values.scatter_(2, slots.expand_as(value_states), value_states)
            return self.keys, self.values
        rows = torch.arange(key_states.shape[0], device=key_states.device) if self.rows is None else self.rows
        heads = torch.arange(key_states.shape[1], device=key_states.device)
        where = (rows[:, None, None], heads[None, :, None], self.slots[:, None, :])
        self.keys.index_put_(where, key_states)
        self.values.index_put_(where, value_states)
        if self.rows is None:
            return self.keys, self.values
        return self.keys.index_select(0, self.rows), self.values.index_select(0, self.rows)


class RowCache(Cache):
    """A preallocated KV cache of `batch_size` rows of `max_cache_len` slots, every row at its own length.

    The lengths live with the engine; before each forward it says where every row's new tokens go (`write_at`),
    and the attention mask it builds says which slots each row sees. transformers' StaticCache keeps one length
    for the whole batch, so it cannot hold sequences that accept different numbers of tokens.
    """

    def __init__(self, config, max_cache_len: int, batch_size: int) -> None:
        layers = config.get_text_config(decoder=True).num_hidden_layers
        self.stack = LayerStack(layers)
        super().__init__(layers=[RowLayer(max_cache_len, batch_size, self.stack) for _ in range(layers)])

    def write_at(self, slots: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """slots: [inputs, tokens] cache slots of the next forward's tokens, per input row (a device tensor); rows:
        [inputs] the cache row each input row belongs to, for a forward on some rows only (None: all, in order)."""
        for layer in self.layers:
            layer.slots, layer.rows = slots, rows

    def move_kv(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy each row's KV at slots `sources` [batch, n] to slots `targets` [batch, n], in every layer."""
        if not is_torchdynamo_compiling():
            self.stack.move(sources, targets)
            return
        # Compiled: layer by layer, through `index_put_` (see the module's docstring; a move of the whole stack
        # was copied whole).
        for layer in self.layers:
            rows, heads = (torch.arange(size, device=sources.device) for size in layer.keys.shape[:2])
            where = (rows[:, None, None], heads[None, :, None], targets[:, None, :])
            for states in (layer.keys, layer.values):
                states.index_put_(where, states[rows[:, None, None], heads[None, :, None], sources[:, None, :]])
