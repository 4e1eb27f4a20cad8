"""User-facing knobs of lookahead decoding, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass


# Defaults of a step that drafts on the device (`device_drafts`): no window, and the depth and tree size `auto` runs
# at batch 1 on CUDA (the tree calibration chose on the H200; docs/benchmarks.md, "H200, eighth session").
DRAFT_DEPTH = 12  # also the depth of every calibrated shape that verifies drafts (tuning.py)
DEVICE_TREE_NODES = 63


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LookaheadConfig.{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"LookaheadConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class LookaheadConfig:
    """Shape of the lookahead step.

    window (W): columns of the Jacobi window, i.e. how many future positions are guessed in parallel; default 7
        (1, no window, for a step that drafts on the device).
    ngram (N): n-gram size; the window keeps N-1 levels, so its trajectories give N-grams; default 5 (2 for a step
        that drafts on the device).
    guesses (G): n-grams kept per key token in the pool; with K, the default size of the verification tree.
    pool_from_prompt: seed the pool with the prompt's n-grams (and keep adding those of the output).
    candidate_length (K): the longest draft verified (the tree's depth), so one step commits at most K+1 tokens;
        default N-1, as in the paper (DRAFT_DEPTH for a step that drafts on the device). A longer K lets text that
        repeats itself (code, the prompt) be copied in fewer steps.
    tree_nodes: draft tokens verified per step, as one token tree; default G·K, the rows of G separate
        candidates of K tokens (the paper's verification branch). Drafts that share a prefix share its nodes.
        For a step that drafts on the device: DEVICE_TREE_NODES, plus the G chains of the pool's n-grams with a
        window.
    device_drafts: the step drafts its own tree on the device, from the model's latest top-k predictions after
        each token (`device_drafts.py`), instead of verifying the host's drafts: no host work per row, and the
        step can be launched before the one before it is read. With a window, the window and its n-gram pool live
        on the device too, and the tree verifies G of the pool's n-grams besides. Left to its defaults,
        `LookaheadConfig(device_drafts=True)` is the device-drafting step `auto` runs at batch 1 on CUDA.

    Defaults suit small models on launch-bound hardware, where extra tokens per step cost almost nothing.
    """

    window: int | None = None
    ngram: int | None = None
    guesses: int = 7
    pool_from_prompt: bool = True
    candidate_length: int | None = None
    tree_nodes: int | None = None
    device_drafts: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.device_drafts, bool):
            raise TypeError(f"LookaheadConfig.device_drafts must be a bool, got {self.device_drafts!r}")
        # Frozen: the defaults are resolved once, here.
        if self.window is None:
            object.__setattr__(self, "window", 1 if self.device_drafts else 7)
        if self.ngram is None:
            object.__setattr__(self, "ngram", 2 if self.device_drafts else 5)
        _check_int("window", self.window, 1)
        _check_int("ngram", self.ngram, 2)
        _check_int("guesses", self.guesses, 0)
        if not isinstance(self.pool_from_prompt, bool):
            raise TypeError(f"LookaheadConfig.pool_from_prompt must be a bool, got {self.pool_from_prompt!r}")
        if self.candidate_length is None:
            object.__setattr__(self, "candidate_length", DRAFT_DEPTH if self.device_drafts else self.ngram - 1)
        _check_int("candidate_length", self.candidate_length, 1)
        if self.tree_nodes is None:
            object.__setattr__(self, "tree_nodes", self._device_pool_nodes() + DEVICE_TREE_NODES if self.device_drafts
                               else self.guesses * self.candidate_length)
        _check_int("tree_nodes", self.tree_nodes, 0)
        if self.device_drafts:
            self._check_device_template()

    def _device_pool_nodes(self) -> int:
        """A device-drafting step's tree nodes that verify the pool's n-grams (none without a window)."""
        from .device_drafts import TemplateShape  # (it imports torch; this module does not)

        return TemplateShape.of(self).pool_nodes

    def _check_device_template(self) -> None:
        from .device_drafts import template_capacity

        if self.tree_nodes == 0:
            raise ValueError("LookaheadConfig.device_drafts needs tree nodes, got tree_nodes=0")
        if self.has_window and self.guesses == 0:
            raise ValueError("LookaheadConfig.device_drafts with a window needs guesses >= 1 (the n-grams of the "
                             "pool verified per step), got guesses=0")
        pool_nodes = self._device_pool_nodes()
        capacity = template_capacity(self.candidate_length, pool_nodes)
        shape = (f"candidate_length={self.candidate_length}, window={self.window}, ngram={self.ngram} and "
                 f"guesses={self.guesses}")
        if self.tree_nodes < pool_nodes:
            raise ValueError(f"LookaheadConfig.device_drafts with {shape} verifies {pool_nodes} tree nodes of the "
                             f"pool's n-grams (G chains of min(N-1, K) nodes), so it needs tree_nodes >= {pool_nodes}, "
                             f"got tree_nodes={self.tree_nodes}")
        if self.tree_nodes > capacity:
            raise ValueError(f"LookaheadConfig.device_drafts drafts at most {capacity} tree nodes with {shape}, got "
                             f"tree_nodes={self.tree_nodes}")

    @property
    def levels(self) -> int:
        """Rows of the Jacobi window (N-1)."""
        return self.ngram - 1

    @property
    def has_window(self) -> bool:
        """Whether the step runs a Jacobi window; (1, 2, G) only verifies candidates."""
        return self.levels * self.window > 1

    @property
    def tokens_per_step(self) -> int:
        """Input length of one fused decode step: (N-1)·W lookahead tokens + the tree's nodes."""
        return self.levels * self.window + self.tree_nodes

    @property
    def verifies(self) -> bool:
        """Whether the step verifies drafts (has tree nodes)."""
        return self.tree_nodes > 0

    @property
    def host_drafts(self) -> bool:
        """Whether the step verifies a tree the host drafted (the sources' drafts)."""
        return self.verifies and not self.device_drafts

    @property
    def follows_on_device(self) -> bool:
        """Whether the step needs nothing from the host but each row's last committed token, which the step
        before left on the device: a plain step, or one that drafts on the device."""
        return self.device_drafts or not (self.has_window or self.verifies)


# Plain one-token greedy decoding as a lookahead step: no window, no candidates.
AUTOREGRESSIVE = LookaheadConfig(window=1, ngram=2, guesses=0, pool_from_prompt=False)
