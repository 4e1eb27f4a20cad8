"""Input layout and attention mask of the fused lookahead + verification step.

One decode step feeds the model, in this order (W = window, N = ngram, G = guesses):

* index 0: the current token (last committed token, position t);
* level 0, columns 1..W-1 (positions t+1..t+W-1); the current token is level 0, column 0;
* levels 1..N-2, columns 0..W-1 (level l, column c sits at position t+l+c);
* G candidates of K tokens each (K = candidate_length, N-1 by default; candidate token j sits at position t+1+j).

Mask rules (algorithm.md, section 1.4): level 0 is an ordinary causal row; a token at level l >= 1, column c
sees level 0 up to column c and column c of levels 1..l; a candidate token sees the current token and the
earlier tokens of its own candidate. Every row also sees the whole KV cache. Both branches share one forward
pass but cannot see each other.

Every step has the same shape (candidates are padded to G), so the template is built once, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LookaheadConfig


@dataclass(frozen=True)
class StepLayout:
    """Index bookkeeping for one fused step; all tensors live on `device`."""

    config: LookaheadConfig
    position_offsets: torch.Tensor  # [S] position of each input row relative to the current token
    allowed: torch.Tensor  # [S, S] bool, True where row q may attend to step row k
    logit_rows: torch.Tensor  # rows whose logits are used: current token, last level, candidates
    candidate_offsets: torch.Tensor  # [K] 0..K-1

    @property
    def size(self) -> int:
        return self.position_offsets.numel()

    @property
    def lookahead_size(self) -> int:
        """Rows of the lookahead branch, the current token included: (N-1)·W."""
        return self.config.levels * self.config.window

    @property
    def candidate_rows(self) -> slice:
        """Input rows of the verification branch: G candidates of K tokens, one after the other."""
        return slice(self.lookahead_size, self.size)

    # Rows of the step's logits (see `logit_rows`): the current token's, then the last level's, then the candidates'.
    # With one level (N=2) the last level is level 0, whose first row is the current token's: it is kept once.
    @property
    def new_level_logits(self) -> slice:
        first = 0 if self.config.levels == 1 else 1
        return slice(first, first + self.config.window)

    @property
    def candidate_logits(self) -> slice:
        return slice(self.new_level_logits.stop, None)

    def candidate_token_rows(self, candidate) -> torch.Tensor:
        """Input rows [K] of one candidate's tokens (`candidate` may be a device tensor)."""
        k = self.config.candidate_length
        return self.candidate_offsets + self.lookahead_size + candidate * k

    @classmethod
    def build(cls, config: LookaheadConfig, device: torch.device | str = "cpu") -> "StepLayout":
        window, levels, guesses, cand_len = config.window, config.levels, config.guesses, config.candidate_length
        lookahead = levels * window
        # Per row: its level and column (lookahead rows) or its candidate and token index (candidate rows).
        row = torch.arange(lookahead)
        level, column = row // window, row % window
        cand_row = torch.arange(guesses * cand_len)
        cand, token = cand_row // cand_len, cand_row % cand_len

        offsets = torch.cat([level + column, 1 + token])

        q_level, k_level = level[:, None], level[None, :]
        q_col, k_col = column[:, None], column[None, :]
        sees_row0 = (k_level == 0) & (k_col <= q_col)
        sees_own_column = (k_level >= 1) & (k_level <= q_level) & (k_col == q_col)
        lookahead_mask = sees_row0 | sees_own_column

        same_candidate = (cand[:, None] == cand[None, :]) & (token[None, :] <= token[:, None])
        size = lookahead + guesses * cand_len
        allowed = torch.zeros(size, size, dtype=torch.bool)
        allowed[:lookahead, :lookahead] = lookahead_mask
        allowed[lookahead:, lookahead:] = same_candidate
        allowed[lookahead:, 0] = True  # candidates continue the current token

        last_level = torch.arange((levels - 1) * window, lookahead)
        current = torch.zeros(0 if levels == 1 else 1, dtype=torch.long)  # level 0 already starts with it
        logit_rows = torch.cat([current, last_level, lookahead + cand_row])
        return cls(config, offsets.to(device), allowed.to(device), logit_rows.to(device),
                   torch.arange(cand_len, device=device))

    def input_ids(self, current: int, window_tokens: list[int], candidates: list[tuple[int, ...]]) -> list[int]:
        """Flatten one step's tokens in layout order; `candidates` must already be padded to G."""
        ids = [current, *window_tokens]
        for candidate in candidates:
            ids.extend(candidate)
        if len(ids) != self.size:
            raise AssertionError(f"step input has {len(ids)} tokens, layout expects {self.size}")
        return ids
