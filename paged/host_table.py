"""The host mirror of every live sequence's page list, kept as rows of one int32 tensor.

`plan()` needs a (Bp, W) page table each step. Rebuilding it from Python lists converts every page of every
sequence in the batch every step (37k ints at batch 128 x 4k tokens, most of `plan()`'s host time). Here each
sequence owns a row that changes only where a page is appended or copied on write, and a step's table is one
indexed copy. Reads and writes go through a numpy view of the same memory: for the few dozen indices of a step
that costs about a microsecond where torch.tensor() + an indexed torch op cost several.
"""

from __future__ import annotations

import numpy as np
import torch


class HostPageTable:
    """Rows of physical page ids on the host, one per live sequence, -1 past the sequence's pages.

    Attributes:
        rows: (R, W) int32 CPU tensor; R grows by doubling as sequences are admitted, W is fixed.
        rows_np: the same memory as a numpy array (replaced with `rows` when the table grows).
    """

    def __init__(self, width: int, initial_rows: int = 64) -> None:
        self.rows = torch.full((initial_rows, width), -1, dtype=torch.int32)
        self.rows_np = self.rows.numpy()
        self._free = list(range(initial_rows - 1, -1, -1))         # popped from the end: lowest row first
        # (snapshot() copies rows and this list: a rejected request must leave both as they were)

    def acquire(self, copy_of: int | None = None) -> int:
        """A free row: all -1, or a copy of row `copy_of` (a fork shares its parent's pages)."""
        if not self._free:
            grown = self.rows.shape[0]
            self.rows = torch.cat([self.rows, torch.full_like(self.rows, -1)])
            self.rows_np = self.rows.numpy()
            self._free = list(range(2 * grown - 1, grown - 1, -1))
        row = self._free.pop()
        if copy_of is not None:
            self.rows_np[row] = self.rows_np[copy_of]
        return row

    def release(self, row: int) -> None:
        self.rows_np[row] = -1
        self._free.append(row)

    def write(self, rows: list[int], columns: list[int], pages: list[int]) -> None:
        """rows[i][columns[i]] = pages[i] for every i, in one indexed write."""
        if rows:
            self.rows_np[rows, columns] = pages

    def gather(self, rows: list[int], padded_rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(padded_rows, W) int32: the given rows in order, then -1 rows; written into `out` when given."""
        table = torch.empty((padded_rows, self.rows.shape[1]), dtype=torch.int32) if out is None else out
        self.gather_np(rows, table.numpy())
        return table

    def gather_np(self, rows: list[int], out: np.ndarray) -> None:
        """out[:len(rows)] = the given rows in order, out[len(rows):] = -1; out is a (>= len(rows), W) int32 array."""
        n = len(rows)
        np.take(self.rows_np, rows, axis=0, out=out[:n], mode="clip")  # "raise" would buffer; rows are ours
        out[n:] = -1
