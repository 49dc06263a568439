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

    def forward(self, x, c, cos, sin, attn_mask, modulation=None, past=None):
        """past: (k, v) [B, H, P, head_dim] of cached tokens x attends to before itself.
        Returns the new x and x's own (k, v), rotary applied, for a cache to keep."""
        B, L, d = x.shape
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (
            modulation if modulation is not None else self.modulation(c)
        )
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

    def forward(self, x, c, modulation=None):
        shift, scale = modulation if modulation is not None else self.modulation(c)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DITBackbone(nn.Module):
    def __init__(self, cfg: MDLMConfig):
        super().__init__()
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.hidden_dim, cfg.vocab_size)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.hidden_dim // cfg.n_heads)
        self.blocks = nn.ModuleList(DDiTBlock(cfg) for _ in range(cfg.n_blocks))
        self.output_layer = DDitFinalLayer(cfg)
        self.frozen_modulation = None  # see freeze_conditioning()

    @torch.no_grad()
    def freeze_conditioning(self, max_positions: int | None = None) -> None:
        """What every inference pass would recompute, computed once (call again after
        changing weights): the rotary table of positions 0 .. max(model_length,
        max_positions) - 1 and, without time conditioning, c and every adaLN output
        (constants then). A cached drafter keeps a context's own positions, which
        may exceed model_length (rotary attention only sees their differences)."""
        self.rotary_emb.freeze(max(self.config.model_length, max_positions or 0))
        if self.config.time_conditioning:
            return
        p = self.output_layer.linear.weight
        c = F.silu(self.sigma_map(torch.zeros(1, device=p.device)))
        self.frozen_modulation = (c, [b.modulation(c) for b in self.blocks],
                                  self.output_layer.modulation(c))

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
        if self.frozen_modulation is not None and not self.training:
            c, block_mods, final_mod = self.frozen_modulation
        else:
            if not self.config.time_conditioning:
                sigma = torch.zeros_like(sigma)
            c, block_mods, final_mod = F.silu(self.sigma_map(sigma)), [None] * len(self.blocks), None
        cos, sin = self.rotary_emb.cos_sin(positions)
        for layer, (block, mod) in enumerate(zip(self.blocks, block_mods)):
            x, kv = block(x, c, cos, sin, attn_mask, mod, None if past is None else past.read(layer))
            if past is not None:
                past.write(layer, *kv)
        if num_last is not None:  # drafting only needs logits of the masked tail
            start = L - num_last
            x = x[:, start : L if num_scored is None else start + num_scored]
        return self.output_layer(x, c, final_mod)


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
