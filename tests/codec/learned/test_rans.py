"""The learned codec's integer rANS (shared by global and local stream version 2): plain
symbols, each of its own table, against the one-symbol methods."""

from __future__ import annotations

import numpy as np
import pytest

from medzip_scp.codec.errors import CorruptStreamError
from medzip_scp.codec.learned.rans import WordStack, cumulative


def _tables(rng: np.random.Generator, n: int, k: int, prec: int) -> np.ndarray:
    """``n`` random rows of ``k`` frequencies, each >= 1 and summing to ``2**prec``."""
    cuts = np.sort(rng.choice(np.arange(1, 1 << prec), (n, k - 1), replace=True), axis=1)
    edges = np.concatenate([np.zeros((n, 1), int), cuts, np.full((n, 1), 1 << prec)], axis=1)
    f = np.diff(edges, axis=1) + 1
    f[np.arange(n), f.argmax(1)] -= f.sum(1) - (1 << prec)
    assert (f >= 1).all() and (f.sum(1) == 1 << prec).all()
    return f


@pytest.mark.parametrize("prec, k", [(16, 2), (16, 16), (24, 5)])
def test_symbols_roundtrip_and_match_one_at_a_time(prec, k):
    rng = np.random.default_rng(prec + k)
    freqs = _tables(rng, 3000, k, prec)
    freqs[:5] = 1
    freqs[:5, 0] = (1 << prec) - (k - 1)  # near-certain rows: the renormalisation edge cases
    symbols = rng.integers(0, k, len(freqs))
    idx = np.arange(len(freqs))
    start = np.cumsum(freqs, axis=1)[idx, symbols] - freqs[idx, symbols]
    batch = WordStack()
    batch.encode_symbols(start.tolist(), freqs[idx, symbols].tolist(), prec)
    tables = cumulative(freqs)
    single = WordStack()
    for i in reversed(range(len(freqs))):
        single.encode(tables[i], int(symbols[i]), prec)
    assert batch.words() == single.words()

    back = WordStack(batch.words())
    assert back.decode_symbols(tables, prec, list(range(len(freqs)))) == symbols.tolist()
    assert back.is_empty()
    with pytest.raises(CorruptStreamError, match="ran out"):
        WordStack(batch.words()[2:]).decode_symbols(tables, prec, list(range(len(freqs))))


def test_empty_stack_is_two_words():
    assert WordStack().words() == [0, 1]
    assert WordStack([0, 1]).is_empty()
