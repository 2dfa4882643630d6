"""Row selection on a flat slice of a row-major [D, F] weight.

ZeRO-3 gives each rank a contiguous slice [start, start + length) of the flattened weight, cut without
regard to rows: row j is flat elements [j*F, (j+1)*F), so a slice may begin and end inside a row. A
RowPartition turns such a slice into at most three 2-D views (the tail of the first row, whole rows,
the head of the last row) so that masking, decay and row extraction are a few broadcast operations with
no [D, F]-sized mask in memory. A whole, unsharded weight is the special case start=0, length=D*F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowPartition:
    start: int
    length: int
    row_len: int  # F
    selected: torch.Tensor  # bool [D], True for rows that train

    @classmethod
    def whole(cls, selected: torch.Tensor, row_len: int) -> RowPartition:
        return cls(0, selected.numel() * row_len, row_len, selected)

    @classmethod
    def of_rank(cls, selected: torch.Tensor, row_len: int, rank: int, per_rank: int) -> RowPartition:
        """ZeRO-3's layout: rank r holds [r*per_rank, (r+1)*per_rank), the last rank zero-padded."""
        numel = selected.numel() * row_len
        start = min(rank * per_rank, numel)
        return cls(start, min(per_rank, numel - start), row_len, selected)

    def pieces(self, local: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(first row, 2-D view) pairs covering local[:length] in order."""
        F, out, pos = self.row_len, [], 0
        row, offset = divmod(self.start, F)
        if offset and self.length:
            n = min(F - offset, self.length)
            out.append((row, local[:n].view(1, n)))
            pos, row = n, row + 1
        full = (self.length - pos) // F
        if full:
            out.append((row, local[pos : pos + full * F].view(full, F)))
            pos, row = pos + full * F, row + full
        if pos < self.length:
            out.append((row, local[pos : self.length].view(1, self.length - pos)))
        return out

    def _rows(self, row: int, view: torch.Tensor) -> torch.Tensor:
        return self.selected[row : row + view.shape[0]].to(view.device)

    def zero_unselected_(self, local: torch.Tensor) -> None:
        for row, view in self.pieces(local):
            view.masked_fill_(~self._rows(row, view).unsqueeze(1), 0)

    def scale_selected_(self, local: torch.Tensor, factor: float) -> None:
        for row, view in self.pieces(local):
            rows = self._rows(row, view)
            view[rows] = view[rows] * factor

    def take(self, local: torch.Tensor) -> torch.Tensor:
        """The selected elements of this slice, in flat (row-major) order."""
        parts = [view[self._rows(row, view)].reshape(-1) for row, view in self.pieces(local)]
        return torch.cat(parts) if parts else local[:0].clone()

    def put_(self, local: torch.Tensor, values: torch.Tensor) -> None:
        """Inverse of take: write `values` into the selected elements of this slice."""
        pos = 0
        for row, view in self.pieces(local):
            rows = self._rows(row, view)
            count = int(rows.sum()) * view.shape[1]
            view[rows] = values[pos : pos + count].view(-1, view.shape[1]).to(view.dtype)
            pos += count

    def selected_before(self, flat_index: int) -> int:
        """How many selected elements lie in the flat range [0, flat_index) of the whole weight."""
        row, offset = divmod(flat_index, self.row_len)
        whole_rows = int(self.selected[:row].sum())
        partial = offset if row < self.selected.numel() and bool(self.selected[row]) else 0
        return whole_rows * self.row_len + partial

    @property
    def num_selected(self) -> int:
        return self.selected_before(self.start + self.length) - self.selected_before(self.start)
