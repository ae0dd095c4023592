"""``nn.MultiheadAttention`` rewritten with explicit ``nn.Linear`` projections.

``nn.MultiheadAttention`` keeps its query / key / value projections in one ``in_proj_weight``
``(3E, E)`` parameter (or three ``*_proj_weight`` parameters) used inside
``F.multi_head_attention_forward``, so they are not ``nn.Linear`` modules that calibration
hooks see or that a factor chain can replace. :class:`ProjectedAttention` computes the same
function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` modules called
in ``forward`` (so each can be replaced by any module of the same input / output widths):

    q = q_proj(query), k = k_proj(key), v = v_proj(value)      (B, L, E) each, split into h heads
    A = softmax(q k^T / sqrt(E / h) + mask)                     per head
    out = out_proj(concat_heads(A v))

with the masks of ``nn.MultiheadAttention`` (``key_padding_mask``, ``attn_mask``, boolean or
additive, ``is_causal``), dropout on ``A`` in training, and ``need_weights`` /
``average_attn_weights``. Outputs equal the original's to float rounding. The fused CPU / GPU
fast paths of ``nn.TransformerEncoderLayer`` need the packed ``in_proj_weight``; with this module
the layers run their regular path, which gives the same outputs on every non-padding position.
Modules with ``add_bias_kv`` or ``add_zero_attn`` are not rewritten (see :func:`can_split`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .surgery import set_module

__all__ = ["ProjectedAttention", "can_split", "split_attention"]


def can_split(mha: nn.MultiheadAttention) -> tuple[bool, str]:
    """Whether :func:`split_attention` rewrites ``mha`` (and why not)."""
    if mha.bias_k is not None or mha.add_zero_attn:
        return False, "MultiheadAttention with add_bias_kv / add_zero_attn: kept dense"
    return True, ""


class ProjectedAttention(nn.Module):
    """Multi-head attention with ``nn.Linear`` projections (see the module docstring). The call
    signature and outputs are those of ``nn.MultiheadAttention``."""

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: int | None = None, vdim: int | None = None,
                 dropout: float = 0.0, bias: bool = True, batch_first: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # what nn.TransformerEncoder(Layer) inspect before choosing their fused fast path
        self.in_proj_weight = self.in_proj_bias = None
        self._qkv_same_embed_dim = False

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "ProjectedAttention":
        """The same attention as ``mha`` (weights copied; same dtype and device)."""
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, dropout=mha.dropout,
                  bias=mha.in_proj_bias is not None, batch_first=mha.batch_first).to(w.device, w.dtype)
        E = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                qw, kw, vw = mha.in_proj_weight[:E], mha.in_proj_weight[E:2 * E], mha.in_proj_weight[2 * E:]
            else:
                qw, kw, vw = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, weight, i in ((new.q_proj, qw, 0), (new.k_proj, kw, 1), (new.v_proj, vw, 2)):
                lin.weight.copy_(weight)
                if mha.in_proj_bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * E:(i + 1) * E])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

    def _mask(self, key_padding_mask, attn_mask, is_causal, B: int, L: int, S: int, dtype) -> torch.Tensor | None:
        """One additive ``(B, h | 1, L, S)`` mask from the two masks (boolean: True = masked)."""
        def additive(m):
            if m is None:
                return None
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=self.q_proj.weight.device).triu(1)
        am = additive(attn_mask)
        if am is not None:
            mask = am.reshape(B, self.num_heads, L, S) if am.dim() == 3 else am.reshape(1, 1, L, S)
        kp = additive(key_padding_mask)
        if kp is not None:
            kp = kp.reshape(B, 1, 1, S)
            mask = kp if mask is None else mask + kp
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            q_in, k_in, v_in = query, key, value
        else:  # (L, B, E) -> (B, L, E)
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, S = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        q, k, v = self._heads(self.q_proj(q_in)), self._heads(self.k_proj(k_in)), self._heads(self.v_proj(v_in))
        mask = self._mask(key_padding_mask, attn_mask, is_causal, B, L, S, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            weights = attn.mean(1) if average_attn_weights else attn
            out = F.dropout(attn, p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        if not (self.batch_first and not unbatched):
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def split_attention(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Replace (in place) every ``nn.MultiheadAttention`` of ``model`` that :func:`can_split`
    by a :class:`ProjectedAttention`. Returns the rewritten names and, for those left as they
    are, the reason."""
    done, kept = [], {}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            ok, why = can_split(m)
            if ok:
                set_module(model, name, ProjectedAttention.from_mha(m))
                done.append(name)
            else:
                kept[name] = why
    return done, kept
