"""Global image context, prompt→image fusion and the DETR-style query decoder with a presence token.

``ContextEncoder`` (DETR's / SAM3's encoder self-attention, reduced): the stride-16 image tokens
attend to each other with positional keys. A CNN's receptive field sees a piece of vessel; the
segment it belongs to ("mid" vs "proximal" LAD, a diagonal vs the LAD) is decided by where that
piece sits in the whole tree, which only a global operation can see.

``PromptFusion`` (SAM3's encoder, reduced to one layer): the coarse image tokens of each find
query attend to that query's prompt tokens, so "mid LAD" and "distal LAD" see different memory.

``QueryDecoder``: a presence token, a semantic token and Q object queries, each layer
    self-attention (among those tokens)
    → cross-attention to the prompt tokens
    → cross-attention to the (prompt-conditioned) image memory, with positional keys
    → FFN,
pre-norm throughout (stable at the high LRs SAM3 uses). Every layer's output is returned so
that the heads can produce ``aux_outputs`` (deep supervision, as DETR and SAM3).
"""

from __future__ import annotations

import torch
from torch import nn


class FFN(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContextLayer(nn.Module):
    """Pre-norm self-attention + FFN over image tokens: (I, L, D), pos (L, D) → (I, L, D)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, 2 * d_model)

    def forward(self, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.norm1(memory)
        q = x + pos
        memory = memory + self.self_attn(q, q, x, need_weights=False)[0]
        return memory + self.ffn(self.norm2(memory))


class ContextEncoder(nn.Module):
    """``num_layers`` ContextLayers: image tokens (I, L, D), pos (L, D) → (I, L, D)."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([ContextLayer(d_model, num_heads) for _ in range(num_layers)])

    def forward(self, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            memory = layer(memory, pos)
        return memory


class PromptFusion(nn.Module):
    """Condition image tokens on the prompt.

    Input:  memory (B, L, D) image tokens of each find query, pos (L, D),
            prompt (B, S, D), prompt_pad (B, S) bool (True = ignore)
    Output: memory (B, L, D)
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.cross = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, 2 * d_model)

    def forward(self, memory, pos, prompt, prompt_pad):
        q = self.norm1(memory) + pos
        memory = memory + self.cross(q, prompt, prompt, key_padding_mask=prompt_pad, need_weights=False)[0]
        return memory + self.ffn(self.norm2(memory))


class DecoderLayer(nn.Module):
    """(B, N, D) queries → (B, N, D); N = 2 special tokens + Q object queries."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm_prompt = nn.LayerNorm(d_model)
        self.prompt_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm_image = nn.LayerNorm(d_model)
        self.image_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, 4 * d_model)

    def forward(self, x, query_pos, prompt, prompt_pad, memory, memory_pos):
        q = self.norm_self(x) + query_pos
        x = x + self.self_attn(q, q, self.norm_self(x), need_weights=False)[0]
        q = self.norm_prompt(x) + query_pos
        x = x + self.prompt_attn(q, prompt, prompt, key_padding_mask=prompt_pad, need_weights=False)[0]
        q = self.norm_image(x) + query_pos
        x = x + self.image_attn(q, memory + memory_pos, memory, need_weights=False)[0]
        return x + self.ffn(self.norm_ffn(x))


class QueryDecoder(nn.Module):
    """Learned tokens → one normalised output per decoder layer.

    Input:  prompt (B, S, D), prompt_pad (B, S), memory (B, L, D), memory_pos (L, D)
    Output: list over layers of (B, 2 + Q, D): index 0 = presence token, 1 = semantic token,
            2… = object queries.
    """

    NUM_SPECIAL = 2

    def __init__(self, d_model: int, num_heads: int, num_layers: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        n = self.NUM_SPECIAL + num_queries
        self.query_content = nn.Embedding(n, d_model)
        self.query_pos = nn.Embedding(n, d_model)
        self.layers = nn.ModuleList([DecoderLayer(d_model, num_heads) for _ in range(num_layers)])
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, prompt, prompt_pad, memory, memory_pos) -> list[torch.Tensor]:
        b = prompt.shape[0]
        x = self.query_content.weight.unsqueeze(0).expand(b, -1, -1)
        pos = self.query_pos.weight.unsqueeze(0)
        outs = []
        for layer in self.layers:
            x = layer(x, pos, prompt, prompt_pad, memory, memory_pos)
            outs.append(self.out_norm(x))
        return outs
