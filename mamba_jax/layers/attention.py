"""Llama-style grouped-query attention with rotary (or learned, or no) positions and a KV cache.

Parameter names follow HF transformers' `LlamaAttention` (q_proj, k_proj, v_proj, o_proj); torch
(out, in) weights are stored transposed (in, out).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Tuple

from mamba_jax.layers.config import ATTENTION, BaseLMConfig, check_choice, check_positive_int

POSITION_EMBEDDINGS = ("rope", "learned", "none")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(BaseLMConfig):
    """Hyper-parameters of a Llama-style Transformer (pre-norm attention + SwiGLU MLP per layer).

    n_kv_heads (None: = n_heads) must divide n_heads (grouped-query attention); head_dim None means
    d_model // n_heads. position_embedding: "rope" (rotary, base `rope_theta`), "learned" (absolute,
    `max_position_embeddings` rows added to the token embeddings) or "none".
    """

    family: ClassVar[str] = "transformer"

    d_intermediate: int = 256
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    position_embedding: str = "rope"
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    attention_bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("TransformerConfig", "n_heads", self.n_heads)
        check_positive_int("TransformerConfig", "max_position_embeddings", self.max_position_embeddings)
        if self.n_kv_heads is not None:
            check_positive_int("TransformerConfig", "n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"TransformerConfig: `n_kv_heads`={self.n_kv_heads} must divide "
                                 f"`n_heads`={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"TransformerConfig: `d_model`={self.d_model} is not divisible by "
                             f"`n_heads`={self.n_heads}; set `head_dim` explicitly")
        if self.head_dim is not None:
            check_positive_int("TransformerConfig", "head_dim", self.head_dim)
        check_choice("TransformerConfig", "position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        if self.position_embedding == "rope" and self.head_dim_value % 2:
            raise ValueError(f"TransformerConfig: rotary embeddings need an even head_dim; got {self.head_dim_value}")

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        return (ATTENTION,) * self.n_layer

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim_value(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def learned_positions(self) -> Optional[int]:
        return self.max_position_embeddings if self.position_embedding == "learned" else None
