"""paged.mods pinned by hand-written truth tables (tests/mod_tables.py), not by comparison with other code."""

from __future__ import annotations

import pytest
import torch

from paged import mods
from tests import mod_tables as T


def _mask_table(mask) -> list[list[int]]:
    q = torch.arange(6)[:, None]
    kv = torch.arange(6)[None, :]
    return mask(torch.tensor(0), torch.tensor(0), q, kv).int().tolist()


@pytest.mark.parametrize(("mask", "table"), [
    (mods.causal, T.CAUSAL),
    (mods.sliding_window(3), T.SLIDING_WINDOW_3),
    (mods.sliding_window(1), T.SLIDING_WINDOW_1),
    (mods.prefix_lm(2), T.PREFIX_LM_2),
    (mods.and_masks(mods.causal, mods.sliding_window(3)), T.SLIDING_WINDOW_3),
], ids=["causal", "window3", "window1", "prefix2", "and_masks"])
def test_mask_truth_table(mask, table):
    assert _mask_table(mask) == table


@pytest.mark.parametrize(("score", "h", "q", "kv", "want"), T.ALIBI_2_HEADS)
def test_alibi_values(score, h, q, kv, want):
    got = mods.alibi(2)(torch.tensor(score, dtype=torch.float64), 0, torch.tensor(h), torch.tensor(q), torch.tensor(kv))
    assert float(got) == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize(("score", "want"), T.SOFT_CAP_2)
def test_soft_cap_values(score, want):
    got = mods.soft_cap(2.0)(torch.tensor(score, dtype=torch.float64), 0, 0, 0, 0)
    assert float(got) == pytest.approx(want, abs=1e-12)


def test_sliding_window_refuses_a_window_below_one():
    with pytest.raises(ValueError, match="window must be >= 1"):
        mods.sliding_window(0)
