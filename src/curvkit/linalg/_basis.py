"""A Krylov basis that lives where it fits: on the device, then in pinned host memory.

A basis of m vectors of a 700M-parameter model is m x 2.8 GB: kept whole on the GPU it would
take the memory the operator's products need. Blocks are stored as they come, on the device
while the basis stays under :data:`DEVICE_SHARE` of the device's memory (and under half of what
is free), the rest in pinned host memory, copied to the device one block at a time to be used.
Only the vectors actually produced are allocated (a top-1 that converges in 6 products holds 6
vectors, not the 30 its basis may grow to).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEVICE_SHARE = 0.1  # most of a CUDA device's memory the basis may take: the products need the rest

_F64 = torch.float64


class Basis:
    """Orthonormal columns in blocks (n, b_i), each on the device or in (pinned) host memory."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str):
        self.n, self.dtype, self.device = n, dtype, torch.device(device)
        self.blocks: list[Tensor] = []
        self.on_device = 0  # bytes of the blocks kept on the device
        self.cap = (DEVICE_SHARE * torch.cuda.get_device_properties(self.device).total_memory
                    if self.device.type == "cuda" else None)  # on the CPU the host is the device

    @property
    def cols(self) -> int:
        return sum(B.shape[1] for B in self.blocks)

    def append(self, Q: Tensor) -> None:
        """Store a copy of the block ``Q`` (n, b)."""
        for part in self._placed(Q):
            self.blocks.append(part)

    def _placed(self, Q: Tensor) -> list[Tensor]:
        """``Q`` split where the device share runs out: the first columns stay, the rest go to host."""
        if self.device.type != "cuda":
            return [Q.clone()]
        per_col = self.n * Q.element_size()
        room = min(self.cap - self.on_device, 0.5 * torch.cuda.mem_get_info(self.device)[0])
        keep = max(0, min(Q.shape[1], int(room // per_col)))
        parts = []
        if keep:
            parts.append(Q[:, :keep].clone())
            self.on_device += keep * per_col
        if keep < Q.shape[1]:
            rest = Q[:, keep:]
            try:
                host = torch.empty(rest.shape, dtype=rest.dtype, pin_memory=True)
            except RuntimeError:  # pinning refused (limits): pageable memory, slower copies
                host = torch.empty(rest.shape, dtype=rest.dtype)
            parts.append(host.copy_(rest))
        return parts

    def _here(self, B: Tensor) -> Tensor:
        return B if B.device == self.device else B.to(self.device, non_blocking=True)

    def orthogonalize(self, W: Tensor, passes: int = 2) -> Tensor:
        """``W -= V (V^T W)`` in place, ``passes`` times (block modified Gram-Schmidt; "twice is
        enough"), returning the summed coefficients ``V^T W`` (cols, b) in float64 on the CPU.
        Cost: ``passes`` reads of the basis (one host-to-device copy per host block per pass)."""
        total = None
        for _ in range(passes):
            cs = []
            for B in self.blocks:
                Bd = self._here(B)
                cs.append(Bd.T @ W)
                W -= Bd @ cs[-1]
            C = torch.cat(cs).to(_F64)
            total = C if total is None else total + C
        return total.to("cpu")  # one host copy per call

    def combine(self, S: Tensor) -> Tensor:
        """``V @ S`` on the device (``S`` (cols, s), any device/dtype). Memory: the (n, s) result."""
        return self._combine(self.blocks, S)

    def restart(self, S: Tensor, chunk: int) -> None:
        """Replace the basis by ``V @ S`` (a thick restart), built ``chunk`` columns at a time. The
        old blocks are freed at the end: while it runs, the device holds both (at most twice the
        device share)."""
        old, self.blocks, self.on_device = self.blocks, [], 0
        for j in range(0, S.shape[1], chunk):
            self.append(self._combine(old, S[:, j : j + chunk]))

    def _combine(self, blocks: list[Tensor], S: Tensor) -> Tensor:
        out = torch.zeros(self.n, S.shape[1], dtype=self.dtype, device=self.device)
        i = 0
        for B in blocks:
            w = B.shape[1]
            out += self._here(B) @ S[i : i + w].to(device=self.device, dtype=self.dtype)
            i += w
        return out
