"""Random numbers keyed by (seed, position, token): counter-based, so a draw never depends on what else runs.

A row's draw for the token at sequence position p is a function of its seed, p and the vocabulary index only, so
it is the same alone or in any batch, on any step shape, and whether that position is computed by a plain step or
inside a verified draft. The hash is a 32-bit integer mixer (xor-shift and multiply, two rounds) written with
int64 tensor ops whose products stay below 2**63, so it is exact on every device.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
# Multipliers of a well-mixing 32-bit hash (odd, below 2**31 so that x * m < 2**63 for x < 2**32).
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_TOKEN_SALT = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of x (int64 holding values in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIERS[0]) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIERS[1]) & MASK32
    return x ^ (x >> 15)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """The per-seed part of every draw's key (int64 seeds in [0, 2**63)), computed once per sequence."""
    return mix32(mix32(seeds & MASK32) ^ (seeds >> 32))


def stream_keys(seed_key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One key per (seed, position) pair: `seed_key` from `seed_keys`, both int64 tensors of one shape."""
    return mix32(seed_key ^ (positions & MASK32))


def token_keys(vocab: int, device) -> torch.Tensor:
    """The per-token half of every draw's key [vocab], computed once per engine."""
    return mix32(torch.arange(vocab, device=device) ^ _TOKEN_SALT)


def race_noise(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log(E) for E ~ Exponential(1), independent for every key [...] and token [V]: float32 [..., V].

    argmax(log p + noise) is a draw from p (the exponential race: the token whose E / p is smallest wins). The
    uniforms have 32 bits, so E >= 2**-33 and the noise spans less than 26: a token less likely than e**-26 times
    the most likely one never wins (in exact sampling it would, with a probability below vocab * 5e-12).
    """
    bits = mix32(keys[..., None] ^ tokens)
    # Small uniforms (large noise, the draws that decide) keep all 32 bits; near 1 float32 rounds, so clamp.
    uniform = ((bits.to(torch.float32) + 0.5) * 2.0**-32).clamp_(max=1 - 2.0**-24)
    return -torch.log(-torch.log1p(-uniform))
