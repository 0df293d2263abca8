"""Block sizes of the selective-scan kernels and how they fit a given problem."""
from __future__ import annotations

import dataclasses

LANES = 128  # TPU vector lane width: the channel block is a multiple of it whenever d allows
SUBLANES = 8  # TPU sublane count: the sequence block is a multiple of it whenever l allows
TRITON_MAX_BLOCK_D = 64  # the Triton variant keeps several float32 (n, block_d) tiles in registers


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one kernel program.

    Attributes:
      block_d: channels per program (the lane dimension on TPU: a multiple of 128 for full vregs).
      block_l: time steps per sequence block; the float32 state (n, block_d) is carried in on-chip
        memory from one sequence block to the next, and the backward pass recomputes the states of one
        block (block_l, n, block_d) from the block's saved start state. A multiple of 8 on TPU.

    `fit` shrinks them to a concrete problem: block_d to a divisor of the channels per B/C group
    (preferring multiples of 128), block_l to the sequence length when it is shorter.
    """

    block_d: int = 128
    block_l: int = 128

    def __post_init__(self):
        for name in ("block_d", "block_l"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BlockSizes: `{name}` must be a positive int; got {value!r}")

    def fit(self, seq_len: int, channels_per_group: int) -> "BlockSizes":
        """The block sizes used for a sequence of `seq_len` steps and groups of `channels_per_group` channels.

        block_d: channels_per_group itself if it is at most `block_d`; else the largest multiple of 128 up
        to `block_d` that divides it; else the largest divisor up to `block_d` (fine in interpret mode,
        not lane-aligned on TPU). block_l: `seq_len` if shorter than `block_l` (the whole sequence is
        one block, which TPU tiling accepts as a full dimension), else `block_l`; the sequence is then
        padded to a multiple of block_l.
        """
        if seq_len < 1 or channels_per_group < 1:
            raise ValueError(f"BlockSizes.fit: sizes must be positive; got seq_len={seq_len}, "
                             f"channels_per_group={channels_per_group}")
        dg = channels_per_group
        if dg <= self.block_d:
            bd = dg
        else:
            aligned = [m for m in range(LANES, self.block_d + 1, LANES) if dg % m == 0]
            bd = aligned[-1] if aligned else max(k for k in range(1, self.block_d + 1) if dg % k == 0)
        bl = seq_len if seq_len <= self.block_l else self.block_l
        return BlockSizes(block_d=bd, block_l=bl)

    def tpu_aligned(self, seq_len: int, channels: int) -> bool:
        """Whether these (fitted) blocks satisfy the TPU (8, 128) tiling for a (seq_len, channels) array."""
        d_ok = self.block_d % LANES == 0 or self.block_d == channels
        padded = -(-seq_len // self.block_l) * self.block_l
        l_ok = self.block_l % SUBLANES == 0 or self.block_l == padded
        return d_ok and l_ok

    def triton_block_d(self, channels_per_group: int) -> int:
        """The channel block of the Triton (GPU) variant for groups of `channels_per_group` channels: a
        power of two (Triton tensor sizes), at most `block_d` (rounded down to a power of two) and
        TRITON_MAX_BLOCK_D, and no wider than the group needs (rounded up); each group's channels are
        then zero-padded to a multiple of it."""
        if channels_per_group < 1:
            raise ValueError(f"BlockSizes.triton_block_d: channels_per_group must be positive; "
                             f"got {channels_per_group}")
        largest = 1 << (min(self.block_d, TRITON_MAX_BLOCK_D).bit_length() - 1)
        needed = 1 << (channels_per_group - 1).bit_length()
        return min(largest, needed)
