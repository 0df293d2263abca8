"""Block sizes of the SSD (Mamba-2) kernels and how they fit a given problem."""
from __future__ import annotations

import dataclasses

TRITON_MAX_CHUNK = 64  # the Triton variant keeps (chunk, chunk) float32 tiles in registers
TRITON_MIN_DIM = 16  # Triton matmuls need every dimension ≥ 16
LANES = 128  # TPU lane width: the chunk is the lane dimension of the transposed (n, chunk) B/C blocks
SUBLANES = 8  # TPU sublane count: the chunk is the sublane dimension of the (chunk, p) and (chunk, n) blocks


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one SSD kernel program (one batch row × one head × one chunk).

    Attributes:
      chunk: time steps per chunk (the official Mamba-2 default is 256). A program computes the chunk's
        (chunk, chunk) segment-sum-masked C Bᵀ form and carries the float32 (n, p) state in on-chip memory
        to the next chunk; the backward recomputes a chunk from its saved start state. On TPU a multiple of
        128 (it is the lane dimension of the transposed B/C blocks (n, chunk)), unless the whole sequence
        is one chunk.

    Heads are not blocked: a program holds one head's full (chunk, p) input and (n, p) state.
    """

    chunk: int = 256

    def __post_init__(self):
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ValueError(f"BlockSizes: `chunk` must be a positive int; got {self.chunk!r}")

    def fit(self, seq_len: int) -> "BlockSizes":
        """The block sizes used for a sequence of `seq_len` steps: the chunk shrinks to `seq_len` when the
        sequence is shorter (one chunk, which TPU tiling accepts as a full dimension); otherwise the
        sequence is padded to a multiple of the chunk."""
        if seq_len < 1:
            raise ValueError(f"BlockSizes.fit: seq_len must be positive; got {seq_len}")
        return BlockSizes(chunk=min(self.chunk, seq_len))

    def tpu_aligned(self, seq_len: int) -> bool:
        """Whether these (fitted) blocks satisfy the TPU tiling: (chunk, ·) blocks need chunk % 8 == 0 and
        (·, chunk) blocks chunk % 128 == 0, unless the chunk is the whole (padded) sequence."""
        padded = -(-seq_len // self.chunk) * self.chunk
        return self.chunk % LANES == 0 or self.chunk == padded

    def triton_chunk(self, seq_len: int) -> int:
        """The chunk of the Triton (GPU) variant for a sequence of `seq_len` steps: a power of two, at most
        `chunk` (rounded down to a power of two) and TRITON_MAX_CHUNK, at least TRITON_MIN_DIM, and no
        longer than `seq_len` needs (rounded up)."""
        if seq_len < 1:
            raise ValueError(f"BlockSizes.triton_chunk: seq_len must be positive; got {seq_len}")
        largest = 1 << (min(self.chunk, TRITON_MAX_CHUNK).bit_length() - 1)
        needed = 1 << (seq_len - 1).bit_length()
        return max(TRITON_MIN_DIM, min(largest, needed))
