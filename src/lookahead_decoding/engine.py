"""The fast engine: the fused step with fixed shapes over a preallocated KV cache, for one sequence or a batch.

Everything a greedy step does — building the mask, the forward, verification and moving the winners' KV into
place — is a device op on fixed-shape buffers, with the cache lengths kept as a device tensor. On CUDA the step
is therefore captured once as a CUDA graph and replayed: one host-to-device copy of the step's ids, one replay,
one device-to-host copy of the outcome. Prompts go in as fixed-size chunks through further graphs, one per number
of rows a prefill runs on: rows refilled mid-batch are prefilled without the rest of the batch. Or, while other
rows decode, a new sequence's prompt rides in the batch's steps (`carry_prompts`): in a step that drafts on the
device, its row takes the next prompt ids in place of a tree, each at its own position and seeing those before it,
and the step commits them as a prefill would. No forward of its own then stalls the decoding rows.
Elsewhere the same functions run eagerly, with identical results.

A batch is B rows of the cache, each holding one sequence at its own length (`kv_cache.RowCache`): every row
runs the same step shape on its own tokens and token tree, sees only its own cache slots and its own step rows
(the batch dimension keeps sequences apart; the mask keeps each row's slots apart), and commits its own number
of tokens. A row that is not decoding (finished, or waiting for a prompt) rides along without changing its
length, so rows can be refilled between steps without recapturing anything.

A step's attention reads the cache from its first slot up to a width that holds what every row may hold by then
(`attention_widths`), not every slot the cache has: one graph per width, the narrowest that fits chosen per step
from the host's bound on the rows' lengths. A server sized for long prompts then pays for the prompts it gets.

With window=1, ngram=2, guesses=0 the step is plain autoregressive decoding on the same engine (`ar-graph` in
the benchmarks), so lookahead can be compared against an equally optimised baseline.

Plain steps, and steps that draft on the device (`device_drafts.py`), can be pipelined (`chain`): the next step
is launched behind one whose outcome the host has not read yet, each row's input taken on the device from the
last token that step commits. The host then reads and records a step while the device computes the next, instead
of leaving the device idle in between.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy
import torch

from .config import LookaheadConfig
from .device_drafts import DeviceDrafter, TemplateShape, template_tree
from .drafting.tree import TokenTree
from .kv_cache import RowCache
from .layout import TreeTensors, tree_tensors
from .model_adapter import ModelAdapter, UnsupportedModelError
from .row_sampler import RowSampler, choose_tokens
from .sampling_params import SamplingParams
from .step import (DeviceBusy, PlannedStep, RowOutcomes, StepOutcome, TokenRows, build_layouts, host_predictions,
                   top_predictions, tree_parents)
from .verification import Verifier, verified_first_token, verify_greedy

# Prompt tokens per prefill chunk. The prefill runs as fixed-shape chunks so that it, too, is one captured graph
# (an eager forward of each new prompt length pays launches and kernel selection; docs/benchmarks.md).
PREFILL_CHUNK = 128
# Columns of a step's input line, from its end (`StaticStep.inputs`): the prompt ids a row carries (0: it decodes),
# 1 if they end its prompt, 1 if the row takes part in the step.
CARRIED, ENDS_PROMPT, TAKES_PART = -3, -2, -1
# The narrowest width a step's attention reads (cache slots from the first); each wider one doubles it, up to what
# the longest sequence's step needs. Every width is a graph of each step shape, recorded up front.
NARROWEST_WIDTH = 256
# Inductor compiles a one-token forward's matrix-vector products as Triton reductions, fused with the norms and
# activations beside them, only under coordinate-descent tuning; cuBLAS's kernels read the Llama-3-8B shape's
# weights at 76% of an H200's bandwidth (docs/benchmarks.md; tuned, its plain step 6.81 -> 5.76 ms on an H100).
# Steps of more tokens keep cuBLAS, and their compilation the default options.
ONE_TOKEN_COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


def attention_widths(widest: int) -> tuple[int, ...]:
    """The widths a step's attention may read, narrowest first, up to `widest` slots."""
    widths = []
    while (NARROWEST_WIDTH << len(widths)) < widest:
        widths.append(NARROWEST_WIDTH << len(widths))
    return (*widths, widest)


class Replayable:
    """A device function with fixed shapes, run eagerly or captured once as a CUDA graph and replayed."""

    def __init__(self, fn) -> None:
        # Never differentiated; and autograd would track the cache's layers, views of one tensor, as one graph.
        self.fn, self.graph, self.output = torch.no_grad()(fn), None, None

    def capture(self, restore) -> None:
        """Record `fn` as a CUDA graph after warm-up runs (on a side stream, as capture requires); `restore`
        undoes what each run did to the cache."""
        # Python's garbage collector must not run while a stream captures: collecting an engine that nobody holds
        # any more (calibration builds several) destroys its graphs, which CUDA forbids during a capture.
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.fn()
                    restore()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.fn()
            restore()
        finally:
            if collecting:
                gc.enable()

    def __call__(self):
        """`fn`'s outputs (on replay, the graph's output buffers: read them before the next call)."""
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.output


class LaunchedStep(NamedTuple):
    """A step launched on the device whose outcome the host has not read yet (`StaticStep.finish_rows`)."""

    shape: int
    width: int  # the cache slots its attention reads (one of the engine's `widths`)
    decoding: Sequence[bool]  # by row: whether the row decodes in this step
    outputs: torch.Tensor  # the packed outcomes on the device, as the step wrote them
    host_outputs: torch.Tensor  # their copy on the host, complete once `done` has fired
    scores: torch.Tensor | None  # the logits along the accepted paths, None once a later step has replaced them
    top: tuple | None  # the top predictions, when the shape reports them
    done: torch.cuda.Event | None  # recorded behind the copy; None where steps run synchronously
    admissions: numpy.ndarray  # by row: prompts the row had been given when the step was launched
    carried: numpy.ndarray  # by row: the prompt ids it carried instead of decoding (`StaticStep.carry_prompts`)

    def busy(self) -> bool:
        """Whether the device still computes the step (a `DeviceBusy`)."""
        return self.done is not None and not self.done.query()


def check_max_length(max_length) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (prompt + new tokens), got {max_length!r}")


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class StaticStep:
    """A `StepRunner` for sequences up to `max_length` tokens (prompt + new tokens), `batch_size` at a time.

    `shapes` is one `LookaheadConfig` or several: every shape gets its own fixed-shape step (and graph) over the
    one cache, and the decoding loop picks a shape per step. Greedy, unless built with `sampling=True`: then each
    row chooses its tokens with its own `SamplingParams` (given when the row starts), on the device, in the same
    captured step. A `verifier` (logits processors) makes every step run eagerly, the verifier deciding each
    row's accepted path on the host.
    """

    def __init__(
        self, model, shapes: LookaheadConfig | Sequence[LookaheadConfig], max_length: int,
        cuda_graph: bool | None = None, compile: bool = False, prefill_chunk: int = PREFILL_CHUNK,
        predictions: int = 0, batch_size: int = 1, verifier: Verifier | None = None, sampling: bool = False,
        pipeline: bool | None = None,
    ) -> None:
        """cuda_graph: capture the steps and the prefill as CUDA graphs (default: on CUDA devices, when greedy).
        compile: fuse each step's kernels with torch.compile first (slow to start; worth it for long runs).
        prefill_chunk: prompt tokens per prefill forward. predictions: how many of the model's top next tokens to
        report at every computed row (0: none). batch_size: sequences decoded side by side, one cache row each.
        pipeline: whether the decoding loop should launch steps behind unread ones where it can (`chain`; default:
        on CUDA, where steps run asynchronously; elsewhere it only adds a step after a row's end)."""
        adapter = ModelAdapter(model)
        if adapter.sliding_window is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses sliding-window attention, which the static engine does not support; "
                "use lookahead_decoding.generate on one sequence at a time (dynamic cache) instead"
            )
        check_max_length(max_length)
        check_batch_size(batch_size)
        if adapter.context_length is not None and max_length > adapter.context_length:
            raise ValueError(f"max_length {max_length} exceeds the model's context length of {adapter.context_length}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        if isinstance(predictions, bool) or not isinstance(predictions, int) or not 0 <= predictions <= adapter.vocab:
            raise ValueError(f"predictions (the model's top next tokens reported per row) must be an integer from 0 "
                             f"to the vocabulary's {adapter.vocab}, got {predictions!r}")
        for name, flag, default in (("compile", compile, False), ("sampling", sampling, False),
                                    ("cuda_graph", cuda_graph, None), ("pipeline", pipeline, None)):
            if not isinstance(flag, bool) and flag is not default:
                raise TypeError(f"{name} must be a bool{' or None' if default is None else ''}, got {flag!r}")
        if verifier is not None and (cuda_graph or compile):
            raise ValueError("a step runner with a verifier runs eagerly: it cannot capture CUDA graphs or compile")
        if verifier is not None and sampling:
            raise ValueError("a step runner samples either with its rows' SamplingParams or with a verifier, not both")
        if verifier is not None and pipeline:
            raise ValueError("a step runner with a verifier reads every step's outcome before the next: it cannot "
                             "pipeline steps")
        device = adapter.device
        shapes = (shapes,) if isinstance(shapes, LookaheadConfig) else tuple(shapes)
        self.adapter, self.layouts = adapter, build_layouts(shapes, device)
        self.max_length, self.prefill_chunk, self.predictions = max_length, prefill_chunk, predictions
        self.batch_size, self.verifier = batch_size, verifier
        self.sampler = RowSampler(batch_size, adapter.vocab, device) if sampling else None
        # Per shape that drafts on the device: its template's input line (parents, nodes), for rows chained in.
        self._template_host_lines = {
            index: numpy.array([*tree_parents(template_tree(TemplateShape.of(shape)), shape.tree_nodes),
                                shape.tree_nodes])
            for index, shape in enumerate(shapes) if shape.device_drafts}
        self._template_lines = {index: torch.tensor(line, device=device)
                                for index, line in self._template_host_lines.items()}
        # Their trees, every node real: a row drafting on the device verifies the template, and one that does not
        # (no nodes) accepts none of them whatever its tree is, so a step needs no tree built from its input.
        self._template_trees = {
            index: tree_tensors(torch.zeros(shapes[index].tree_nodes, dtype=torch.long, device=device),
                                line[:-1], line[-1], shapes[index].candidate_length)
            for index, line in self._template_lines.items()}
        largest = max(layout.size for layout in self.layouts)
        # A step's rows, or a padded prefill chunk, are written after the last committed token: spare slots.
        cache_length = max_length + max(largest, prefill_chunk, max(s.candidate_length for s in shapes) + 1)
        self.cache = RowCache(model.config, cache_length, batch_size)
        drafting = [shape for shape in shapes if shape.device_drafts]
        # Its texts hold what the cache does, and a step's committed tokens past the cache's end (K at most).
        self.drafter = DeviceDrafter(adapter.vocab, device, drafting, batch_size,
                                     cache_length + max(s.candidate_length for s in shapes)) if drafting else None
        self.key_index = torch.arange(cache_length, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached, per row
        # What each step's attention may read: widths of the cache from its first slot, up to a step's rows after
        # the longest sequence, each its own graph (compiled, its own compilation: a compiled engine reads the whole
        # cache). Only our attention takes a mask narrower than the cache. The host's bound on each row's length
        # picks the width: exact after a prefill or a read step, plus the most each launched, unread step may add.
        narrow = adapter.takes_narrow_masks and not compile
        self.widths = attention_widths(max_length + largest) if narrow else (cache_length,)
        self.length_bound = numpy.zeros(batch_size, dtype=numpy.int64)
        self.admissions = numpy.zeros(batch_size, dtype=numpy.int64)  # prompts each row has been given
        # Per shape, one line per row: step ids, the tree's parents, its number of real nodes, the prompt ids the row
        # carries instead (0: it decodes; else its step ids are those ids), 1 if they end its prompt, 1 if the row
        # takes part (CARRIED, ENDS_PROMPT, TAKES_PART).
        sizes = [layout.size + layout.config.tree_nodes + 4 for layout in self.layouts]
        self.inputs = [torch.zeros(batch_size, size, dtype=torch.long, device=device) for size in sizes]
        self.host_inputs = [torch.zeros(batch_size, size, dtype=torch.long, pin_memory=device.type == "cuda")
                            for size in sizes]
        # Prefill, by number of entries (`prefill_entries`): per entry, the chunk's ids aligned to its end (so that
        # every entry's last token is the last column), the number of real ids (0: the entry's row takes no part),
        # 1 if the chunk ends the prompt, and the entry's cache row.
        self.chunk_inputs: dict[int, torch.Tensor] = {}
        self.chunk_columns = torch.arange(prefill_chunk, device=device)
        self.last_position = (adapter.context_length or 2**62) - 1
        self.use_graph = device.type == "cuda" and verifier is None if cuda_graph is None else cuda_graph
        self.pipelined = device.type == "cuda" and verifier is None if pipeline is None else pipeline
        self.compile = compile
        # The shapes whose steps can carry prompts: not with a verifier (it chooses on the host), nor where a shape
        # runs a device window (a prefill starts a row's window from its prompt).
        windows = any(shape.device_drafts and shape.has_window for shape in shapes)
        self.prompt_carriers = () if verifier is not None or windows else tuple(
            index for index, layout in enumerate(self.layouts) if layout.carries_prompts)
        # (shape, or None for the prefill; its entries; the sampler's stages; the attention's width) -> the step or
        # prefill chunk as run for that: a sampling engine records one graph per set of stages its rows use, so that
        # a step does only what its rows ask for.
        self._replayables: dict[tuple, Replayable] = {}
        # Where steps run asynchronously (CUDA), each shape's outcomes are copied to one of two pinned host buffers
        # in turn, an event recorded behind the copy: a step can be launched while the one before is still unread.
        self._host_outputs: list[list] = [[] for _ in self.layouts]
        self._turn = [0] * len(self.layouts)

    @property
    def asynchronous(self) -> bool:
        """Whether a launched step returns before the device has computed it (CUDA)."""
        return self.adapter.device.type == "cuda"

    @property
    def captured(self) -> bool:
        return any(replayable.graph is not None for replayable in self._replayables.values())

    def replayable(self, shape: int | None, entries: int | None = None, width: int | None = None) -> Replayable:
        """The step of `shape` whose attention reads `width` cache slots (one of `widths`; default: all), or the
        prefill chunk (shape None) of `entries` rows (default: all), for the rows' current sampling stages;
        recorded as a CUDA graph on first use once the engine captures."""
        stages = () if self.sampler is None else self.sampler.stages
        entries = self.batch_size if shape is None and entries is None else entries
        width = None if shape is None else self.widths[-1] if width is None else width
        key = (shape, entries, stages, width)
        if key not in self._replayables:
            if shape is None:
                if entries not in self.chunk_inputs:  # one buffer per size, whatever the stages
                    self.chunk_inputs[entries] = torch.zeros(entries, self.prefill_chunk + 3, dtype=torch.long,
                                                             device=self.lengths.device)
                function = functools.partial(self._device_prefill_chunk, entries)
            else:
                function = functools.partial(self._device_step, shape, width)
                if self.compile:
                    one_token = self.batch_size == 1 and self.layouts[shape].size == 1
                    function = torch.compile(function, dynamic=False,
                                             options=ONE_TOKEN_COMPILE_OPTIONS if one_token else None)
            self._replayables[key] = Replayable(function)
            if self.use_graph and self.captured:
                self._capture([self._replayables[key]])
        return self._replayables[key]

    def capture(self) -> None:
        """Capture every step shape and the prefill as CUDA graphs now (otherwise the first prefill does it)."""
        if self.adapter.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this engine's model is on {self.adapter.device}")
        if self.verifier is not None:
            raise ValueError("a step runner with a verifier runs eagerly: it cannot capture CUDA graphs")
        self.use_graph = True
        if not self.captured:
            with torch.inference_mode():
                self.prefill_rows({0: [0]})

    def capture_sampling(self, sampling: SamplingParams) -> None:
        """Capture (and, compiled, compile) every step and prefill for rows that sample with `sampling` now, rather
        than under the first request that does: each set of sampling stages has graphs of its own. Only while no
        row decodes (a server's start): it starts and ends a sequence in row 0."""
        if self.sampler is None:
            raise ValueError("this engine is greedy: build it with sampling=True to capture sampled steps")
        self.capture()
        self.sampler.start_rows({0: sampling})
        try:
            with torch.inference_mode():
                self._every_replayable()  # the engine has captured: each new step or prefill is captured as made
        finally:
            self.sampler.end_rows([0])

    # ------------------------------------------------------------------------------------------ one sequence

    def prefill(self, prompt: torch.Tensor, history: Sequence[int]) -> StepOutcome:
        """Cache one sequence's prompt in row 0 (the `StepRunner` protocol)."""
        return self.prefill_rows({0: prompt.tolist()})[0]

    def step(self, shape: int, step_ids: list[int], tree: TokenTree, history: Sequence[int]) -> StepOutcome:
        """One step of the sequence in row 0 (the `StepRunner` protocol)."""
        others = [None] * (self.batch_size - 1)
        return self.step_rows(shape, [PlannedStep(shape, step_ids, tree), *others], [history, *others])[0]

    # ------------------------------------------------------------------------------------------ a batch

    def prefill_entries(self, rows: int) -> int:
        """How many rows a prefill of `rows` new prompts runs on: the next power of two, at most the batch. The
        rows that are not starting ride along without changing; a forward on every row would cost a long prompt's
        chunks over the whole batch each time one row is refilled."""
        return min(1 << (rows - 1).bit_length(), self.batch_size)

    def prefill_rows(self, prompts: dict[int, Sequence[int]],
                     sampling: dict[int, SamplingParams | None] | None = None) -> dict[int, StepOutcome]:
        """Start a sequence in each given row: cache its prompt (tokens) in place of what the row held, and take
        its `sampling` parameters (missing or None: greedy). The other rows keep their sequences. Each outcome
        commits that row's first new token. The forwards run on the given rows only (`prefill_entries`)."""
        sampling = sampling or {}
        if self.sampler is None and any(p is not None and not p.is_plain_greedy for p in sampling.values()):
            raise ValueError("this engine decodes greedily; build it with sampling=True to sample or apply penalties")
        for row, prompt in prompts.items():
            if not 0 <= row < self.batch_size:
                raise ValueError(f"row {row} does not exist in a batch of {self.batch_size}")
            if not 0 < len(prompt) < self.max_length:
                raise ValueError(f"the prompt ({len(prompt)} tokens) does not fit this engine's max_length "
                                 f"{self.max_length}")
        chunk = self.prefill_chunk
        starting = torch.tensor(list(prompts), device=self.lengths.device)
        self.lengths.index_fill_(0, starting, 0)
        if self.drafter is not None:
            self.drafter.start_requests(starting)
        for row, prompt in prompts.items():
            self.length_bound[row] = len(prompt)
            self.admissions[row] += 1
        if self.sampler is not None:
            self.sampler.start_rows({row: sampling.get(row) for row in prompts})
        entries = self.prefill_entries(len(prompts))
        if entries == self.batch_size:  # every row, in order
            rows = list(range(self.batch_size))
        else:  # the new prompts' rows, then rows that ride along
            rows = sorted(prompts)
            rows += [row for row in range(self.batch_size) if row not in prompts][: entries - len(rows)]
        prefill = self.replayable(None, entries)
        outcomes = {}
        for begin in range(0, max(len(prompt) for prompt in prompts.values()), chunk):
            lines = [[0] * (chunk + 2) + [row] for row in rows]
            for line, row in zip(lines, rows):
                ids = prompts.get(row, ())[begin : begin + chunk]
                line[chunk - len(ids) : chunk] = ids
                line[chunk] = len(ids)
                line[chunk + 1] = int(row in prompts and begin < len(prompts[row]) <= begin + chunk)
            self.chunk_inputs[entries].copy_(torch.tensor(lines))
            first, scores = prefill()
            firsts = first.tolist()
            for entry, (line, row) in enumerate(zip(lines, rows)):
                if line[chunk + 1]:  # the prompt's last chunk
                    first_token = firsts[entry] if self.verifier is None else \
                        verified_first_token(self.verifier, scores[entry], prompts[row])
                    outcomes[row] = StepOutcome(0, [], [first_token], [], scores[entry : entry + 1].clone())
        if self.use_graph and not self.captured:  # only now: the cache allocates its buffers on first use
            self._capture(self._every_replayable())
        return outcomes

    def carry_prompts(self, rows: Sequence[int], sampling: dict[int, SamplingParams | None] | None = None) -> None:
        """Start a new sequence in each of `rows`, in place of what the row held, with its `sampling` parameters
        (missing or None: greedy), whose prompt the next steps carry instead of a prefill: steps of a shape in
        `prompt_carriers`, laid out by a `TokenRows` whose `prompts` give the row its next ids (a prompt, at most
        a step's rows at a time). The step that carries the prompt's last ids commits the sequence's first token,
        as `prefill_rows` would; the ones before commit nothing."""
        if not self.prompt_carriers:
            raise ValueError("this engine's steps cannot carry prompts (it has a verifier, a device window, or no "
                             "shape that drafts on the device): prefill them with prefill_rows")
        sampling = sampling or {}
        if self.sampler is None and any(p is not None and not p.is_plain_greedy for p in sampling.values()):
            raise ValueError("this engine decodes greedily; build it with sampling=True to sample or apply penalties")
        for row in rows:
            if not 0 <= row < self.batch_size:
                raise ValueError(f"row {row} does not exist in a batch of {self.batch_size}")
        starting = torch.tensor(list(rows), device=self.lengths.device)
        self.lengths.index_fill_(0, starting, 0)
        self.drafter.start_requests(starting)
        self.length_bound[list(rows)] = 0
        self.admissions[list(rows)] += 1
        if self.sampler is not None:
            self.sampler.start_rows({row: sampling.get(row) for row in rows})

    def _every_replayable(self) -> list[Replayable]:
        """Every step shape at every width, and the prefill at every size (a capture while rows decode would stall
        them), for the rows' current sampling stages."""
        sizes = {self.prefill_entries(count) for count in range(1, self.batch_size + 1)}
        return [*(self.replayable(None, size) for size in sorted(sizes)),
                *(self.replayable(shape, width=width) for shape in range(len(self.layouts)) for width in self.widths)]

    def step_rows(self, shape: int, steps: Sequence[PlannedStep | None] | TokenRows,
                  histories: Sequence[Sequence[int] | None] | None,
                  overlap: Callable[[DeviceBusy], None] | None = None) -> RowOutcomes:
        """One step of `shape` for every row: steps[row] is the row's planned step, or None for a row that is not
        decoding; histories[row] its committed tokens (the current token last). Or a `TokenRows` (histories None),
        for a shape that drafts nothing on the host. `overlap` runs on the host while
        the device computes the step (on CUDA the step is launched asynchronously), told whether it still does.
        Outcomes by row."""
        launched = self.launch_rows(shape, steps, histories)
        if overlap is not None:
            overlap(launched.busy)
        return self.finish_rows(launched)

    @property
    def takes_token_rows(self) -> bool:
        """Whether `launch_rows` and `step_rows` take a `TokenRows` for a shape that drafts nothing on the host
        (not with a verifier, which reads every row's history)."""
        return self.verifier is None

    def launch_rows(self, shape: int, steps: Sequence[PlannedStep | None] | TokenRows,
                    histories: Sequence[Sequence[int] | None] | None) -> LaunchedStep:
        """Launch `step_rows`'s step without reading its outcome. `steps` may be a `TokenRows` (and `histories`
        None) for a shape that drafts nothing on the host."""
        carried = numpy.zeros(self.batch_size, dtype=numpy.int64)
        if isinstance(steps, TokenRows):
            decoding = self._write_token_rows(shape, steps)
            carried = self.host_inputs[shape].numpy()[:, CARRIED].copy()
        else:
            decoding = self._write_planned(shape, steps, histories)
        self.inputs[shape].copy_(self.host_inputs[shape], non_blocking=True)
        width = self._width(shape)
        if self.verifier is None:
            packed, scores, top = self.replayable(shape, width=width)()
        else:
            packed, scores, top = self._verified_step(shape, width, steps, histories)
        return self._launched(shape, width, decoding, packed, scores, top, carried)

    def _width(self, shape: int) -> int:
        """The narrowest of `widths` that holds every row's tokens, as far as the host knows, and a step of
        `shape`'s rows after them."""
        needed = int(self.length_bound.max()) + self.layouts[shape].size
        return next((width for width in self.widths if width >= needed), self.widths[-1])

    def _write_planned(self, shape: int, steps: Sequence[PlannedStep | None],
                       histories: Sequence[Sequence[int] | None]) -> list[bool]:
        """Write each row's planned step into the shape's host input buffer; returns which rows decode."""
        if len(steps) != self.batch_size or len(histories) != self.batch_size:
            raise ValueError(f"a step of this engine takes {self.batch_size} rows, got {len(steps)}")
        layout = self.layouts[shape]
        config = layout.config
        idle = [0] * (layout.size + config.tree_nodes + 4)
        lines = []
        for step, history in zip(steps, histories):
            if step is None:
                lines.append(idle)
                continue
            if len(history) > self.max_length:  # the cache has no room for the step's rows
                raise ValueError(f"generation ran past this engine's max_length {self.max_length}")
            lines.append([*step.ids, *tree_parents(step.tree, config.tree_nodes), len(step.tree), 0, 0, 1])
        self.host_inputs[shape].numpy()[:] = lines  # straight into the (pinned) buffer: no tensor from lists
        return [step is not None for step in steps]

    def _write_token_rows(self, shape: int, rows: TokenRows, lines: numpy.ndarray | None = None) -> numpy.ndarray:
        """Write a `TokenRows` step into `lines` (default: the shape's host input buffer), as `_write_planned` would
        write each row's planned step (every id the current token; the template's parents where the row drafts on
        the device, no nodes elsewhere), and the prompt ids rows carry; returns which rows take part."""
        layout = self.layouts[shape]
        config = layout.config
        if config.host_drafts:
            raise ValueError(f"a step of {config} verifies the host's drafts: it needs each row's planned step")
        if len(rows.current) != self.batch_size:
            raise ValueError(f"a step of this engine takes {self.batch_size} rows, got {len(rows.current)}")
        if (rows.lengths[rows.decoding] > self.max_length).any():  # the cache has no room for the step's rows
            raise ValueError(f"generation ran past this engine's max_length {self.max_length}")
        prompts = rows.prompts or {}
        if prompts and shape not in self.prompt_carriers:
            raise ValueError(f"a step of {config} cannot carry prompts; this engine's carriers are shapes "
                             f"{list(self.prompt_carriers)}")
        for row, part in prompts.items():
            if not 0 < len(part.ids) <= layout.size:
                raise ValueError(f"row {row} carries {len(part.ids)} prompt ids; a step of {config} carries 1 to "
                                 f"{layout.size}")
        lines = self.host_inputs[shape].numpy() if lines is None else lines
        lines[:, : layout.size] = rows.current[:, None]
        lines[:, layout.size : layout.size + config.tree_nodes] = config.tree_nodes  # no parent: no node
        lines[:, layout.size + config.tree_nodes :] = (0, 0, 0, 1)  # no nodes, no prompt ids; the row takes part
        if shape in self._template_host_lines:
            lines[rows.drafting, layout.size : layout.size + config.tree_nodes + 1] = self._template_host_lines[shape]
        lines[~rows.decoding] = 0
        decoding = rows.decoding.copy()
        for row, part in prompts.items():  # the ids, then padding, each its own row of the step; no tree
            lines[row, : layout.size] = 0
            lines[row, : len(part.ids)] = part.ids
            lines[row, layout.size : layout.size + config.tree_nodes] = config.tree_nodes
            lines[row, layout.size + config.tree_nodes :] = (0, len(part.ids), part.ends_prompt, 1)
            decoding[row] = True
        return decoding

    def chain(self, previous: LaunchedStep, changes: dict[int, int | None], shape: int | None = None,
              rows: TokenRows | None = None) -> LaunchedStep:
        """Launch a step behind `previous`, a step whose outcome the host has not read: each row that decoded in it
        goes on from the last token it commits, taken on the device. `changes` by row: the current token of a row
        that starts decoding (its prefill has committed it; where the shape drafts on the device, the row drafts),
        or None for a row that stops. The step is of `previous`'s shape, or of `shape` with the rows laid out by
        `rows` (a `TokenRows` of the rows after `changes`; the current token of a row that goes on is taken on the
        device), which it needs where either step carries prompt ids: a row that carries ids takes them from the
        host, and one whose prompt's last ids `previous` carried goes on from the first token it committed. Only a
        shape that needs nothing else from the host: plain, or drafting on the device."""
        shape = previous.shape if shape is None else shape
        config = self.layouts[shape].config
        if not config.follows_on_device:
            raise ValueError(f"only a plain step or one that drafts on the device can be chained, not {config}")
        inputs = self.inputs[shape]  # [the current token, (tree ids, parents, nodes: the device's), 1 if decoding]
        accepted, committed = previous.outputs[:, :1], previous.outputs[:, 1:]
        last = committed.gather(1, accepted)[:, 0]  # the last token each row committed
        carried = numpy.zeros_like(self.length_bound)
        # Host inputs go from pinned memory: a pageable copy would wait for the steps in flight.
        if shape != previous.shape or previous.carried.any() or rows is not None and rows.prompts:
            if rows is None:
                raise ValueError("a step chained behind one of another shape, or where prompt ids ride, needs its "
                                 "rows' TokenRows")
            # The whole input, in a buffer of its own: the shape's host buffer may still be on its way to a step.
            pinned = self.host_inputs[shape].is_pinned()
            lines = torch.empty(self.host_inputs[shape].shape, dtype=torch.long, pin_memory=pinned)
            decoding = self._write_token_rows(shape, rows, lines.numpy())
            carried = lines.numpy()[:, CARRIED].copy()
            goes_on = numpy.asarray(previous.decoding, dtype=bool) & decoding & (carried == 0)
            goes_on[list(changes)] = False
            lines[:, 0].masked_fill_(torch.from_numpy(goes_on), -1)  # taken on the device, below
            inputs.copy_(lines.to(inputs.device, non_blocking=pinned))
            inputs[:, 0].copy_(torch.where(inputs[:, 0] < 0, last, inputs[:, 0]))
        else:
            inputs[:, 0].copy_(last)
            decoding = list(previous.decoding)
            if changes:
                for row, token in changes.items():
                    decoding[row] = token is not None
                host = torch.tensor([[row, token or 0, token is not None] for row, token in changes.items()],
                                    pin_memory=self.host_inputs[shape].is_pinned())
                update = host.to(inputs.device, non_blocking=True)
                inputs[update[:, 0], 0] = update[:, 1]
                inputs[update[:, 0], -1] = update[:, 2]
                if shape in self._template_lines:
                    size = self.layouts[shape].size
                    inputs[update[:, 0], size : size + config.tree_nodes + 1] = self._template_lines[shape]
        width = self._width(shape)
        packed, scores, top = self.replayable(shape, width=width)()
        return self._launched(shape, width, decoding, packed, scores, top, carried)

    def _launched(self, shape: int, width: int, decoding: Sequence[bool], packed, scores, top,
                  carried: numpy.ndarray) -> LaunchedStep:
        """The launched step, its outcomes on their way to the host; each decoding row's length bound raised by
        the most the step may commit, or by the prompt ids it carried."""
        self.length_bound[numpy.asarray(decoding, dtype=bool) & (carried == 0)] += 1 + self._deepest_path(shape)
        self.length_bound += carried
        admissions = self.admissions.copy()
        if packed.device.type != "cuda":  # the step has run
            return LaunchedStep(shape, width, decoding, packed, packed, scores, top, None, admissions, carried)
        buffers, turn = self._host_outputs[shape], self._turn[shape]
        if len(buffers) <= turn:
            buffers.append((torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True), torch.cuda.Event()))
        self._turn[shape] = 1 - turn
        host, done = buffers[turn]
        host.copy_(packed, non_blocking=True)
        done.record()
        return LaunchedStep(shape, width, decoding, packed, host, scores, top, done, admissions, carried)

    def finish_rows(self, launched: LaunchedStep) -> RowOutcomes:
        """Read a launched step's outcomes (waiting for the device): by row, None where the row did not decode."""
        if launched.done is not None:
            launched.done.synchronize()
        predictions = None if launched.top is None else host_predictions(*launched.top)
        outputs = launched.host_outputs.numpy().copy()
        # The bound took the most the step could commit; a row that still holds the same prompt committed its own
        # (its accepted path, first in its outcome). A row given a new prompt since has an exact bound already.
        same = numpy.asarray(launched.decoding, dtype=bool) & (self.admissions == launched.admissions) \
            & (launched.carried == 0)
        self.length_bound[same] -= self._deepest_path(launched.shape) - outputs[same, 0]
        return RowOutcomes(outputs, launched.decoding, self.layouts[launched.shape].config, launched.scores,
                           predictions)

    def _deepest_path(self, shape: int) -> int:
        """The most tokens a step of `shape` may commit beyond its current token: its tree's depth, if it has one."""
        config = self.layouts[shape].config
        return config.candidate_length if config.tree_nodes else 0

    # ------------------------------------------------------------------------------------------ on the device

    def _device_prefill_chunk(self, entries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each entry's chunk of prompt tokens to its row's cache (and teach the device tables the model's
        top-k next tokens after each of them); the token chosen after every entry's last token (the argmax, or the
        row's draw), and the logits [entries, V] that chose it. An entry's real ids go to
        its row's next slots, its padding (the chunk's first columns) to slots past them, which later writes
        replace; every column sees the slots up to its own, so real tokens see exactly their row's prompt so far."""
        chunk, inputs = self.prefill_chunk, self.chunk_inputs[entries]
        ids, count, rows = inputs[:, :chunk], inputs[:, chunk : chunk + 1], inputs[:, chunk + 2]
        ends_prompt = inputs[:, chunk + 1 : chunk + 2] > 0
        start = self.lengths[rows][:, None]
        offset = self.chunk_columns - (chunk - count)  # >= 0 for the real ids
        slots = torch.where(offset >= 0, start + offset, start + count + self.chunk_columns)
        positions = slots.clamp(max=self.last_position)
        allowed = self.key_index <= slots[:, :, None]
        some_rows = None if entries == self.batch_size else rows  # (the whole batch comes in row order)
        self.cache.write_at(slots, some_rows)
        mask = self.adapter.attention_mask(allowed, positions, None)
        # Every position's logits where the tables learn from them, else the last one's alone.
        every_logit = self.adapter.forward(ids, positions, mask, self.cache, 1 if self.drafter is None else chunk)
        logits = every_logit[:, -1]
        self.lengths.index_add_(0, rows, count[:, 0])
        if self.drafter is not None:
            self.drafter.write_text(slots, ids, rows)
            befores = self.drafter.text[rows[:, None], (slots - 1).clamp(min=0)]
            self.drafter.learn(ids, befores, every_logit, rows, offset >= 0)
            self.drafter.start_windows(rows, self.lengths[rows], ends_prompt[:, 0])
        if self.sampler is None:
            return logits.argmax(dim=-1), logits
        self.sampler.observe_prompt(ids, offset >= 0, some_rows)
        sampler = self.sampler if some_rows is None else self.sampler.select(some_rows)
        first = sampler.choose(logits[:, None], self.lengths[rows][:, None])  # the first new token's position
        self.sampler.observe_output(first, ends_prompt, some_rows)
        return first[:, 0], logits

    def _device_forward(self, shape: int, width: int):
        """Every row's step rows through the model, attending to the first `width` cache slots: (logits
        [batch, R, V] of the layout's logit rows, the rows' trees, the rows' lengths before the step, the step's
        input ids, the draw noise of the positions the tree draws at or None: `RowSampler.tree_noise`)."""
        layout = self.layouts[shape]
        config = layout.config
        size, nodes, depth = layout.size, config.tree_nodes, config.candidate_length  # depth: K
        inputs = self.inputs[shape]
        step_ids, parents, num_nodes = inputs[:, :size], inputs[:, size : size + nodes], inputs[:, size + nodes]
        carries = shape in self.prompt_carriers
        carried = inputs[:, CARRIED] > 0 if carries else None  # rows that carry prompt ids (`carry_prompts`)
        order = torch.arange(size, device=inputs.device)
        start = self.lengths.clone()  # tokens cached before this step; the current token goes there
        if self.drafter is not None:
            self.drafter.write_text(start[:, None], step_ids[:, :1])
            before = self.drafter.text.gather(1, (start[:, None] - 1).clamp(min=0))[:, 0]  # the current's pair
        noise = None
        if self.sampler is not None and config.tree_nodes:
            noise = self.sampler.tree_noise(start, depth)
        if config.device_drafts:  # the host sent the template's tree (or none); its tokens are drafted here
            drafts = self.drafter.draft(step_ids[:, 0], before, start, config, noise)
            window = [self.drafter.window_tokens(config.window, config.levels)] if config.has_window else []
            step_ids = torch.cat([step_ids[:, :1], *window, drafts], dim=1)
        if carries:  # a carrying row keeps its ids, which its text holds from its first on
            step_ids = torch.where(carried[:, None], inputs[:, :size], step_ids)
            self.drafter.write_text(start[:, None] + order * carried[:, None],
                                    torch.where(carried[:, None], step_ids, step_ids[:, :1]))
        if config.device_drafts:
            template, rows = self._template_trees[shape], step_ids.shape[0]
            tree = TreeTensors(step_ids[:, layout.tree_rows], template.parents.expand(rows, -1),
                               template.ancestors.expand(rows, -1, -1), template.depths.expand(rows, -1),
                               template.valid & (num_nodes[:, None] > 0))
        else:
            tree = torch.vmap(functools.partial(tree_tensors, max_depth=depth))(step_ids[:, layout.tree_rows],
                                                                                parents, num_nodes)
        offsets = torch.vmap(layout.positions)(tree)
        step_allowed = torch.vmap(layout.allowed)(tree)  # [batch, S, S]
        if carries:  # a carried id stands at its own position and sees the ids before it
            offsets = torch.where(carried[:, None], order, offsets)
            step_allowed = torch.where(carried[:, None, None], order[:, None] >= order[None, :], step_allowed)
        positions = (offsets + start[:, None]).clamp(max=self.last_position)
        slots = start[:, None] + order
        # A row sees its cache before `start` and, among its step rows, what the layout allows.
        relative = self.key_index[:width] - start[:, None]  # [batch, width]
        in_step = (relative >= 0) & (relative < size)
        index = relative.clamp(0, size - 1)[:, None, :].expand(-1, size, -1)
        allowed = (relative < 0)[:, None, :] | (in_step[:, None, :] & step_allowed.gather(2, index))
        self.cache.write_at(slots)
        mask = self.adapter.attention_mask(allowed, positions, None)
        logits = self.adapter.forward(step_ids, positions, mask, self.cache, layout.logit_rows)
        if config.device_drafts:  # each computed row's token, after its parent's (the current one's: `before`)
            tree_ids = step_ids[:, layout.tree_rows]
            nodes_then_current = torch.cat([tree_ids, step_ids[:, :1]], dim=1)  # the root is column `nodes`
            befores = torch.cat([before[:, None], nodes_then_current.gather(1, parents)], dim=1)
            keep = None
            if carries:  # a carried id follows the one before it; its padding teaches nothing
                befores = torch.where(carried[:, None], torch.cat([before[:, None], step_ids[:, :-1]], dim=1), befores)
                keep = ~carried[:, None] | (order < inputs[:, CARRIED, None])
            self.drafter.learn(torch.cat([step_ids[:, :1], tree_ids], dim=1), befores,
                               layout.current_and_tree(logits), keep=keep)
            if config.has_window:  # after the tree's: where both wrote, the window's predictions stay
                self.drafter.iterate_window(config.window, config.levels, step_ids[:, : layout.lookahead_size],
                                            before, logits[:, : layout.lookahead_size])
        elif self.drafter is not None and layout.size == 1:  # a plain step keeps the tables fresh too
            self.drafter.learn(step_ids[:, :1], before[:, None], logits[:, :1])
        return logits, tree, start, step_ids, noise

    def _device_commit(self, shape: int, start: torch.Tensor, result: torch.Tensor) -> None:
        """Keep each decoding row's current token and accepted path (`result`: the packed outcomes): move the
        path's KV right behind the current token (all K rows, so the shape is fixed), set the row's length to what
        was committed, and count the committed tokens for the penalties."""
        layout = self.layouts[shape]
        depth = layout.config.candidate_length
        accepted, committed, path = result[:, 0], result[:, 1 : 2 + depth], result[:, 2 + depth :]
        active, carried = self.inputs[shape][:, TAKES_PART], self.inputs[shape][:, CARRIED]
        carries = shape in self.prompt_carriers
        # Cached: the current token and the accepted path, or the prompt ids a row carried (whose KV stays put).
        cached = torch.where(carried > 0, carried, 1 + accepted) if carries else 1 + accepted
        if layout.config.tree_nodes > 0:
            behind = start[:, None] + 1 + torch.arange(depth, device=start.device)
            sources = start[:, None] + layout.lookahead_size + path
            self.cache.move_kv(torch.where(carried[:, None] > 0, behind, sources) if carries else sources, behind)
        self.lengths.copy_(start + cached * active)
        if self.drafter is not None:  # (past what a row committed, stale tokens that later steps replace)
            first = start + (torch.where(carried > 0, carried, 1) if carries else 1)  # the first committed's place
            self.drafter.write_text(first[:, None] + torch.arange(depth + 1, device=start.device), committed)
        if self.sampler is not None:  # (a carried prompt's first token counts once its last ids are in)
            counts = active > 0
            if carries:
                counts &= (carried == 0) | (self.inputs[shape][:, ENDS_PROMPT] > 0)
            self.sampler.observe_step(committed, accepted, counts)

    def _outputs(self, shape: int, logits, step_ids, result, path, new_level, first_logits=None):
        """(the packed outcome per row as `StepOutcome.from_host` reads it, the logits [batch, K+1, V] along the
        accepted paths, the top predictions (row tokens, top tokens, probabilities) or None); `new_level`: the
        argmax [batch, W] of the window's last level; `first_logits` [batch, 1, V]: those that chose each row's
        first committed token, where not the current token's (a carrier's step)."""
        layout = self.layouts[shape]
        committed_logits = logits[:, :1] if first_logits is None else first_logits
        if layout.config.tree_nodes > 0:
            tree_logits = logits[:, layout.tree_logits]
            along_path = tree_logits.gather(1, path[:, :, None].expand(-1, -1, tree_logits.shape[-1]))
            committed_logits = torch.cat([committed_logits, along_path], dim=1)
        top = None
        # A plain step's one row per sequence adds little to a recycled table; computing and reading it back
        # would cost every step. A step that drafts on the device keeps its own table there.
        if self.predictions and layout.config.host_drafts:
            top = (step_ids[:, layout.logit_rows], *top_predictions(logits, self.predictions))
        return torch.cat([result, new_level], dim=1), committed_logits, top

    def _device_step(self, shape: int, width: int):
        """The step of every row (its attention reading `width` cache slots): forward, tree verification against
        the tokens the rows choose (the argmax, or each row's draw: `row_sampler.choose_tokens`), KV commit. See
        `_outputs`."""
        layout = self.layouts[shape]
        depth = layout.config.candidate_length
        logits, tree, start, step_ids, noise = self._device_forward(shape, width)
        verified = layout.current_and_tree(logits)
        choices = choose_tokens(self.sampler, verified, tree, start, layout.config, noise)
        first_logits = None
        if shape in self.prompt_carriers:  # a carrying row's first token: its choice after its last id (no tree)
            carried = self.inputs[shape][:, CARRIED, None]
            last = (carried - 1).clamp(min=0)
            # The logits after each row's first committed position: the current token's, or its last carried id's.
            first_logits = logits.gather(1, last[..., None].expand(-1, 1, logits.shape[-1]))
            if self.sampler is None:
                after_prompt = choices.gather(1, last)
            else:  # drawn as a prefill draws it: at its position, the penalties knowing the ids just carried
                self.sampler.observe_prompt(step_ids, (carried > 0) & (torch.arange(step_ids.shape[1],
                                                                                    device=carried.device) < carried))
                after_prompt = self.sampler.choose(first_logits, start[:, None] + carried)
            choices = torch.cat([torch.where(carried > 0, after_prompt, choices[:, :1]), choices[:, 1:]], dim=1)
        verify = torch.vmap(functools.partial(verify_greedy, max_depth=depth))
        result = verify(choices[:, 0], choices[:, 1:], tree)
        self._device_commit(shape, start, result)
        new_level = logits[:, layout.new_level_logits].argmax(dim=-1)  # the window refines by argmax
        return self._outputs(shape, logits, step_ids, result, result[:, 2 + depth :], new_level, first_logits)

    def _verified_step(self, shape: int, width: int, steps, histories):
        """The step of every row with the verifier deciding, row by row on the host, what each row accepts."""
        layout = self.layouts[shape]
        depth = layout.config.candidate_length
        logits, tree, start, step_ids, _ = self._device_forward(shape, width)
        tree_logits = logits[:, layout.tree_logits]
        idle = torch.zeros(2 + 2 * depth, dtype=torch.long, device=logits.device)  # accepts nothing
        result = torch.stack([
            idle if step is None else
            self.verifier(logits[row, 0], TreeTensors(*(part[row] for part in tree)), tree_logits[row], depth, history)
            for row, (step, history) in enumerate(zip(steps, histories))
        ])
        self._device_commit(shape, start, result)
        new_level = logits[:, layout.new_level_logits].argmax(dim=-1)  # the window refines by argmax
        return self._outputs(shape, logits, step_ids, result, result[:, 2 + depth :], new_level)

    def _capture(self, replayables: Sequence[Replayable]) -> None:
        """Record steps as CUDA graphs; warm-up runs leave the rows' lengths and token counts as they found them
        (what they write past a row's length, later steps overwrite)."""
        state = [self.lengths] + ([] if self.sampler is None else [self.sampler.output_counts, self.sampler.in_prompt])
        saved = [tensor.clone() for tensor in state]

        def restore() -> None:
            for tensor, copy in zip(state, saved):
                tensor.copy_(copy)

        for replayable in replayables:
            replayable.capture(restore)
