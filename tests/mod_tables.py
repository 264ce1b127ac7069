"""Explicit truth tables of the attention modifications, written out by hand (not computed), shared by the tests
that pin `paged.mods` (tests/test_mods.py) and the oracle's own rules (tests/test_oracle_rules.py).

Masks: TABLE[q][kv] is 1 when the query at logical position q sees the key at kv (positions 0..5).
Scores: (score, head, q, kv) -> expected adjusted score.
"""

from __future__ import annotations

CAUSAL = [
    [1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1],
]

SLIDING_WINDOW_3 = [
    [1, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 0],
    [0, 0, 0, 1, 1, 1],
]

SLIDING_WINDOW_1 = [[int(q == kv) for kv in range(6)] for q in range(6)]  # only itself

PREFIX_LM_2 = [
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1],
]

# ALiBi with 2 heads: slopes 2**-4 = 0.0625 (head 0) and 2**-8 = 0.00390625 (head 1); score + slope * (kv - q).
ALIBI_2_HEADS = [
    (0.0, 0, 3, 1, -0.125),
    (0.0, 1, 3, 1, -0.0078125),
    (1.5, 0, 4, 4, 1.5),
    (1.0, 0, 5, 0, 0.6875),
    (-2.0, 1, 2, 0, -2.0078125),
]

# Soft cap 2: 2 * tanh(score / 2).
SOFT_CAP_2 = [
    (0.0, 0.0),
    (1.0, 0.9242343145200195),
    (-1.0, -0.9242343145200195),
    (10.0, 1.9998184085251902),
    (-40.0, -2.0),
]
