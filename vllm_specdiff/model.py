"""The MDLM drafter: a diffusion transformer (DiT) over token sequences, in one file.

Same architecture and parameter names as MDLM's ``DITBackbone`` (Sahoo et al., 2024;
checkpoint ``kuleshov-group/mdlm-owt``), so its ``model.safetensors`` loads as is:

- token embedding is a raw parameter ``vocab_embed.embedding`` [V, d];
- conditioning c = SiLU(TimestepEmbedder(sigma)) drives adaLN-Zero shift / scale /
  gate in every block and in the output layer;
- rotary embeddings (rotate-half) on q and k, bidirectional attention;
- LayerNorm with weight only, computed in float32;
- an untied output head with bias.

``MDLM.forward`` returns raw logits; the SUBS parameterisation (mask logit -inf,
clean tokens carried over) is applied by the sampler in ``drafter.py``.

One addition, a config field: ``attention = "block_causal"`` (BD3-LM's layout) makes
the context attend causally while the draft block (the last ``block_len`` positions)
attends to the whole context and bidirectionally within itself. The context's keys
and values then never depend on the draft, so a drafter can keep them per request
(``Past``) and encode only the tokens accepted since its last step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


ATTENTIONS = ("bidirectional", "block_causal")


@dataclass
class MDLMConfig:
    """The fields of mdlm-owt's ``config.json`` (the rest of that file is ignored)."""

    vocab_size: int = 50258  # GPT-2 BPE + one mask token (the last id)
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False
    # "bidirectional" (MDLM, mdlm-owt) | "block_causal" (causal context, bidirectional
    # draft block): see the module docstring.
    attention: str = "bidirectional"
    # The context window W this drafter drafts best with (None: the whole context); the
    # plugin uses it when speculative_config.context_window is 'auto' (the default).
    draft_context_window: int | None = 16

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"MDLM config: attention={self.attention!r}, allowed: {list(ATTENTIONS)}")

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @classmethod
    def from_dict(cls, d: dict) -> "MDLMConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (as MDLM does)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (self.dim,))
        return (y * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half (NeoX) convention, base 10000."""

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        # Stored in mdlm-owt's file, so kept as a persistent buffer.
        self.register_buffer("inv_freq", inv_freq)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # see freeze()

    def _compute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def freeze(self, max_positions: int) -> None:
        """Tabulate cos / sin of positions 0 .. max_positions - 1 once, for inference
        (every drafting pass then only gathers its rows)."""
        self._table = self._compute(torch.arange(max_positions, device=self.inv_freq.device))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] -> cos, sin [B, 1, L, head_dim] (the caller keeps positions
        inside the frozen table)."""
        if self._table is not None and not self.training:
            cos, sin = self._table[0][positions], self._table[1][positions]
        else:
            cos, sin = self._compute(positions)
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., L, head_dim] (q and k may come stacked, [2, B, H, L, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of sigma -> MLP; mdlm-owt names it ``sigma_map``."""

    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10_000) * torch.arange(half, device=sigma.device).float() / half
        )
        args = sigma.float()[:, None] * freqs[None]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


Linear = tuple[torch.Tensor, "torch.Tensor | None"]  # weight (maybe prepacked), bias


class Folded(NamedTuple):
    """A block's inference weights with its constant adaLN modulation folded in (no
    time conditioning: c is the same every pass). LayerNorm then modulate is one
    LayerNorm with weight ``w (1 + scale)`` and bias ``shift``; a gate scales the
    output rows of the linear before it. A small drafter's pass at batch 1 is ~700
    small ops, each paying its dispatch: this removes ~100 of them. The linears'
    weights may be held in another dtype than the activations (``freeze_conditioning``'s
    ``matmul_dtype``)."""

    norm1: tuple[torch.Tensor, torch.Tensor]
    qkv: Linear
    attn_out: Linear  # rows scaled by gate_msa
    norm2: tuple[torch.Tensor, torch.Tensor]
    fc1: Linear
    fc2: Linear  # the mlp's last linear, scaled by gate_mlp


class FoldedBackbone(NamedTuple):
    blocks: list[Folded]
    norm_final: tuple[torch.Tensor, torch.Tensor]  # the output layer's, modulation folded
    head: Linear


def folded_norm(norm: "LayerNorm", shift: torch.Tensor, scale: torch.Tensor):
    """(weight, bias) of ``modulate(norm(x), shift, scale)`` as one LayerNorm (float32,
    as the norm computes)."""
    weight = norm.weight.float() * (1 + scale.float().flatten())
    return weight, shift.float().flatten()


def folded_layer_norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), *norm).to(x.dtype)


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
              row_scale: torch.Tensor | None = None) -> Linear:
    """An inference copy of a linear layer's weights in ``dtype``, its output rows
    scaled by ``row_scale`` (a folded gate); on a CPU, in oneDNN's own layout
    (``prepacked``)."""
    if row_scale is not None:
        weight = row_scale.float()[:, None] * weight.float()
        bias = None if bias is None else row_scale.float() * bias.float()
    return prepacked(weight.to(dtype)), None if bias is None else bias.to(dtype)


def prepacked(weight: torch.Tensor) -> torch.Tensor:
    """A CPU weight reordered once into oneDNN's blocked layout (an opaque mkldnn
    tensor that ``matmul`` multiplies by: the same product, bfloat16 bit for bit,
    float32 within rounding). ``F.linear`` packs its weight anew on every call, which
    at a drafter's few rows costs about as much as the multiply: a [12, 256] x [256,
    1024] bfloat16 linear takes 67 us through ``F.linear`` and 34 us prepacked on a
    2-core EPYC (float32: 78 / 52). Other devices keep the tensor."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def matmul(x: torch.Tensor, linear: Linear, gelu: bool = False) -> torch.Tensor:
    """``F.linear`` in the weights' dtype, the result in x's; ``gelu``: then the
    tanh-approximated GELU (fused into the multiply for a prepacked weight)."""
    weight, bias = linear
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(
            x.to(weight.dtype), weight, bias, "gelu" if gelu else "none", [],
            "tanh" if gelu else "").to(x.dtype)
    y = F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
    return F.gelu(y, approximate="tanh") if gelu else y


class DDiTBlock(nn.Module):
    def __init__(self, cfg: MDLMConfig):
        super().__init__()
        d, self.n_heads = cfg.hidden_dim, cfg.n_heads
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )
        self.dropout = cfg.dropout
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)

    def modulation(self, c):
        return self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)

    @torch.no_grad()
    def fold(self, modulation, matmul_dtype: torch.dtype) -> Folded:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m.flatten() for m in modulation)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return Folded(
            folded_norm(self.norm1, shift_msa, scale_msa),
            linear_of(self.attn_qkv.weight, None, matmul_dtype),
            linear_of(self.attn_out.weight, None, matmul_dtype, gate_msa),
            folded_norm(self.norm2, shift_mlp, scale_mlp),
            linear_of(fc1.weight, fc1.bias, matmul_dtype),
            linear_of(fc2.weight, fc2.bias, matmul_dtype, gate_mlp))

    def forward_folded(self, x, w: Folded, cos, sin, attn_mask, past=None,
                       rows: slice | None = None):
        """``forward`` with the modulation folded into the weights (inference only).
        ``rows``: the columns whose output is wanted (the last block's, when only the
        draft block is scored); every column's keys and values are still computed,
        the attention and MLP run for ``rows`` only, and only they are returned."""
        B, L, d = x.shape
        qkv = matmul(folded_layer_norm(x, w.norm1), w.qkv)
        qkv = qkv.view(B, L, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        qk = apply_rotary(qkv[:2], cos, sin)
        q, k, v = qk[0], qk[1], qkv[2]
        kv = (k, v)
        if past is not None:
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        if rows is not None:
            x, q = x[:, rows], q[:, :, rows]
            if attn_mask is not None and attn_mask.shape[-2] > 1:
                attn_mask = attn_mask[..., rows, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + matmul(a.transpose(1, 2).reshape(B, x.shape[1], d), w.attn_out)
        h = matmul(folded_layer_norm(x, w.norm2), w.fc1, gelu=True)
        return x + matmul(h, w.fc2), kv

    def forward(self, x, c, cos, sin, attn_mask, past=None):
        """past: (k, v) [B, H, P, head_dim] of cached tokens x attends to before itself.
        Returns the new x and x's own (k, v), rotary applied, for a cache to keep."""
        B, L, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv = (k, v)
        if past is not None:
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        a = self.attn_out(a.transpose(1, 2).reshape(B, L, d))
        x = x + gate_msa * F.dropout(a, self.dropout, self.training)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * F.dropout(self.mlp(h), self.dropout, self.training), kv


class DDitFinalLayer(nn.Module):
    def __init__(self, cfg: MDLMConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_dim)
        self.linear = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)

    def modulation(self, c):
        return self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)

    def forward(self, x, c):
        shift, scale = self.modulation(c)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def forward_folded(self, x, norm: tuple[torch.Tensor, torch.Tensor], head: Linear):
        return matmul(folded_layer_norm(x, norm), head)


class DITBackbone(nn.Module):
    def __init__(self, cfg: MDLMConfig):
        super().__init__()
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.hidden_dim, cfg.vocab_size)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.hidden_dim // cfg.n_heads)
        self.blocks = nn.ModuleList(DDiTBlock(cfg) for _ in range(cfg.n_blocks))
        self.output_layer = DDitFinalLayer(cfg)
        # The inference weights with c's modulation folded in (freeze_conditioning).
        self.folded: FoldedBackbone | None = None

    @torch.no_grad()
    def freeze_conditioning(self, max_positions: int | None = None,
                            matmul_dtype: torch.dtype | None = None) -> None:
        """What every inference pass would recompute, computed once (call again after
        changing weights): the rotary table of positions 0 .. max(model_length,
        max_positions) - 1 and, without time conditioning, every adaLN output (constants
        then), folded into the weights (``Folded``). A cached drafter keeps a context's
        own positions, which may exceed model_length (rotary attention only sees their
        differences). ``matmul_dtype``: the folded linears' weights (default: the
        model's dtype); bfloat16 halves the bytes a pass streams, which is its cost on
        a CPU (``DiffusionDrafter``)."""
        self.rotary_emb.freeze(max(self.config.model_length, max_positions or 0))
        if self.config.time_conditioning:
            return
        p = self.output_layer.linear.weight
        c = F.silu(self.sigma_map(torch.zeros(1, device=p.device)))
        shift, scale = self.output_layer.modulation(c)
        dtype = matmul_dtype or p.dtype
        head = self.output_layer.linear
        self.folded = FoldedBackbone([b.fold(b.modulation(c), dtype) for b in self.blocks],
                                     folded_norm(self.output_layer.norm_final, shift, scale),
                                     linear_of(head.weight, head.bias, dtype))

    def forward(self, ids, sigma, positions=None, attn_mask=None, num_last=None, past=None,
                num_scored=None):
        """attn_mask: bool, True = may attend, broadcastable to [B, 1, L, P + L] (P the
        cached columns of ``past``, 0 without it). Logits of the last ``num_last``
        columns only, and of those only the first ``num_scored`` (a left-to-right
        drafting pass needs the positions it reveals, not the whole masked tail)."""
        B, L = ids.shape
        if positions is None:
            positions = torch.arange(L, device=ids.device).expand(B, L)
        x = self.vocab_embed(ids)
        folded = self.folded if not self.training else None
        if folded is None:
            if not self.config.time_conditioning:
                sigma = torch.zeros_like(sigma)
            c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb.cos_sin(positions)
        # Drafting only needs logits of the masked tail (of it, the scored columns).
        scored = None
        if num_last is not None:
            start = L - num_last
            scored = slice(start, L if num_scored is None else start + num_scored)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            cached = None if past is None else past.read(layer)
            if folded is None:
                x, kv = block(x, c, cos, sin, attn_mask, past=cached)
            else:
                # The last block's other columns feed nothing but their keys and values.
                x, kv = block.forward_folded(x, folded.blocks[layer], cos, sin, attn_mask,
                                             cached, rows=scored if layer == last else None)
            if past is not None:
                past.write(layer, *kv)
        if scored is not None and folded is None:
            x = x[:, scored]
        if folded is None:
            return self.output_layer(x, c)
        return self.output_layer.forward_folded(x, folded.norm_final, folded.head)


def padding_mask(real: torch.Tensor) -> torch.Tensor:
    """real [B, L] (True = a real token) -> [B, 1, 1, L]: attend to real tokens only."""
    return real[:, None, None, :]


def block_causal_mask(real: torch.Tensor, block_len: int, causal_context: bool = True) -> torch.Tensor:
    """real [B, L] -> bool [B, 1, L, L] for a canvas [context, block of block_len]:
    a context column attends to the real context columns up to itself (to all of them
    if not ``causal_context``), a block column to every real column; every column
    attends to itself, so padding rows never have an empty softmax."""
    B, L = real.shape
    idx = torch.arange(L, device=real.device)
    context_len = L - block_len
    if causal_context:
        allowed = idx[None, :] <= idx[:, None]
    else:
        allowed = (idx[None, :] < context_len).expand(L, L)
    allowed = allowed | (idx[:, None] >= context_len)
    mask = (allowed[None] & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=real.device)
    return mask[:, None]


class Past:
    """Keys and values of context tokens encoded by earlier passes, for one batch.

    ``k``/``v`` are a cache's whole store [n_blocks, slots, H, capacity, head_dim];
    batch row b attends to its slot's first ``length`` columns (the attention mask
    hides what is past each row's own length), and the pass writes the keys and values
    of its query columns ``src`` of rows ``rows`` to columns ``cols`` of slots
    ``slots[rows]`` (the context tokens it encodes; the draft block is never kept).
    """

    def __init__(self, k, v, slots, length, rows=None, src=None, cols=None):
        self.k, self.v, self.slots, self.length = k, v, slots, length
        self.rows, self.src, self.cols = rows, src, cols

    def read(self, layer: int):
        if not self.length:
            return None
        return (self.k[layer, self.slots, :, : self.length],
                self.v[layer, self.slots, :, : self.length])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.rows is None:
            return
        dst = self.slots[self.rows]
        self.k[layer, dst, :, self.cols] = k[self.rows, :, self.src]
        self.v[layer, dst, :, self.cols] = v[self.rows, :, self.src]


class MDLM(nn.Module):
    """MDLM with mdlm-owt's module names: every weight is ``backbone.*``."""

    def __init__(self, cfg: MDLMConfig):
        super().__init__()
        self.config = cfg
        self.backbone = DITBackbone(cfg)
        self.apply(self._init_weights)
        # adaLN-Zero: modulation starts at zero so each block starts as identity.
        for mod in [*(b.adaLN_modulation for b in self.backbone.blocks),
                    self.backbone.output_layer.adaLN_modulation]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        sigma: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        num_last: int | None = None,
        block_len: int | None = None,
        num_scored: int | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L] -> raw logits [B, L, V] (or [B, num_last, V]).

        positions [B, L] are rotary positions (default 0..L-1); key_padding_mask
        [B, L] is True for real tokens (padding is never attended to); block_len: the
        draft block, the last columns (block-causal drafters only); num_scored: of the
        last num_last columns, logits of the first num_scored only.
        """
        if sigma is None:
            sigma = torch.zeros(input_ids.shape[0], device=input_ids.device)
        if self.config.attention == "block_causal":
            if block_len is None:
                raise ValueError("a block-causal MDLM needs block_len (the draft block's length)")
            real = (key_padding_mask if key_padding_mask is not None
                    else torch.ones_like(input_ids, dtype=torch.bool))
            mask = block_causal_mask(real, block_len)
        else:
            mask = None if key_padding_mask is None else padding_mask(key_padding_mask)
        return self.backbone(input_ids, sigma, positions, mask, num_last, num_scored=num_scored)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
