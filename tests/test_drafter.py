"""The MDLM drafter without vLLM: checkpoint layout, batching, q, seeds.

Runs on the CPU by default; ``SPECDIFF_TEST_DEVICE=cuda`` runs the same tests on a
GPU (``benchmarks/gpu_check.py`` does, on machines without vLLM).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from vllm_specdiff.drafter import DiffusionDrafter
from vllm_specdiff.loader import (DrafterNotFoundError, load_mdlm, read_config,
                                  resolve_drafter, save_mdlm)
from vllm_specdiff.model import MDLM, MDLMConfig, linear_of, matmul

DEVICE = torch.device(os.environ.get("SPECDIFF_TEST_DEVICE", "cpu"))


def small_mdlm(vocab=101, seed=0) -> MDLM:
    torch.manual_seed(seed)
    m = MDLM(MDLMConfig(vocab_size=vocab, model_length=128, hidden_dim=32, cond_dim=16,
                        n_blocks=2, n_heads=2, dropout=0.0))
    for p in m.parameters():  # leave adaLN-Zero's identity start, so outputs vary
        p.data.add_(0.05 * torch.randn_like(p))
    return m.eval()


def small_drafter(vocab=101, **kwargs) -> DiffusionDrafter:
    return DiffusionDrafter(small_mdlm(vocab).to(DEVICE), **kwargs)


MDLM_OWT_NAMES = [
    "backbone.vocab_embed.embedding", "backbone.sigma_map.mlp.0.weight",
    "backbone.sigma_map.mlp.0.bias", "backbone.sigma_map.mlp.2.weight",
    "backbone.sigma_map.mlp.2.bias", "backbone.rotary_emb.inv_freq",
    "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn_qkv.weight",
    "backbone.blocks.0.attn_out.weight", "backbone.blocks.0.norm2.weight",
    "backbone.blocks.0.mlp.0.weight", "backbone.blocks.0.mlp.0.bias",
    "backbone.blocks.0.mlp.2.weight", "backbone.blocks.0.mlp.2.bias",
    "backbone.blocks.0.adaLN_modulation.weight", "backbone.blocks.0.adaLN_modulation.bias",
    "backbone.output_layer.norm_final.weight", "backbone.output_layer.linear.weight",
    "backbone.output_layer.linear.bias", "backbone.output_layer.adaLN_modulation.weight",
    "backbone.output_layer.adaLN_modulation.bias",
]


def test_mdlm_owt_layout_round_trip(tmp_path):
    from safetensors import safe_open

    m = small_mdlm()
    save_mdlm(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ["vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks",
                "n_heads", "dropout", "time_conditioning"]:
        assert key in cfg
    assert cfg["model_type"] == "mdlm"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert set(MDLM_OWT_NAMES) <= names
    loaded = load_mdlm(tmp_path, device=DEVICE)
    ids = torch.randint(0, 100, (2, 17))
    torch.testing.assert_close(loaded(ids.to(DEVICE)).cpu(), m(ids), atol=1e-4, rtol=1e-4)
    assert read_config(tmp_path).mask_token_id == 100


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_folded_inference_weights_compute_what_the_modules_do(attention):
    """freeze_conditioning folds the constant adaLN modulation into LayerNorm and
    linear weights; the logits must be the modules' own (small_mdlm's modulation is
    far from identity, so a dropped shift, scale or gate shows)."""
    m = small_mdlm()
    m.config.attention = attention
    ids = torch.randint(0, 100, (3, 20))
    real = torch.ones(3, 20, dtype=torch.bool)
    real[1, :5] = False  # a left-padded row
    with torch.inference_mode():
        reference = m(ids, block_len=6)
        padded = m(ids, key_padding_mask=real, block_len=6)
        m.backbone.freeze_conditioning()
        torch.testing.assert_close(m(ids, block_len=6), reference, atol=1e-5, rtol=1e-5)
        # Scoring only some of the tail, the last block runs for those columns alone.
        torch.testing.assert_close(m(ids, key_padding_mask=real, block_len=6, num_last=6,
                                     num_scored=4), padded[:, -6:-2], atol=1e-5, rtol=1e-5)
        # Weights multiplied in bfloat16: the same function at bfloat16's precision.
        m.backbone.freeze_conditioning(matmul_dtype=torch.bfloat16)
        assert m.backbone.folded.head[0].dtype == torch.bfloat16
        torch.testing.assert_close(m(ids, block_len=6), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linears_multiply_as_f_linear(dtype):
    """On a CPU the folded linears are reordered once into oneDNN's layout; ``matmul``
    through them, and its fused GELU, computes what F.linear then F.gelu do, for any
    number of rows (none included) and for strided inputs."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32, device=DEVICE), torch.randn(48, device=DEVICE)
    linear = linear_of(weight, bias, dtype)
    assert linear[0].is_mkldnn == (DEVICE.type == "cpu" and torch.backends.mkldnn.is_available())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for rows in (0, 1, 7):
        x = torch.randn(rows, 2, 32, device=DEVICE).transpose(0, 1)
        reference = F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype)).float()
        torch.testing.assert_close(matmul(x, linear), reference, **tol)
        torch.testing.assert_close(matmul(x, linear, gelu=True),
                                   F.gelu(reference, approximate="tanh"), **tol)


def test_time_conditioned_drafters_are_not_folded():
    """Their modulation changes with sigma; nor do they multiply in another dtype."""
    m = small_mdlm()
    m.config.time_conditioning = True
    drafter = DiffusionDrafter(m, steps=1, schedule="left_to_right", context_window=16,
                               matmul_dtype=torch.bfloat16)
    assert m.backbone.folded is None and drafter.matmul_dtype == torch.float32
    assert small_drafter(steps=1, schedule="left_to_right", context_window=16,
                         matmul_dtype=torch.bfloat16).matmul_dtype == torch.bfloat16


def test_drafter_dtype_auto_multiplies_in_bfloat16_only_where_the_cpu_does(monkeypatch):
    from vllm_specdiff import loader

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    f32, bf16 = torch.float32, torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(loader, "native_bf16_matmul", lambda device, n=native: n)
        assert loader.drafter_dtypes("auto", f32, cpu) == (f32, bf16 if native else f32)
        assert loader.drafter_dtypes("auto", bf16, cpu) == (bf16, bf16)
        assert loader.drafter_dtypes("float32", f32, cpu) == (f32, f32)
        assert loader.drafter_dtypes("float16", f32, cpu) == (torch.float16, torch.float16)
    monkeypatch.undo()
    assert not loader.native_bf16_matmul(cuda)


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16], ids=["own", "bfloat16"])
def test_drafts_do_not_depend_on_batch_neighbours(matmul_dtype):
    """Padding is masked: a row drafts the same alone and beside longer rows (so a
    seeded request reproduces whatever it is batched with), also with bfloat16
    multiplies (drafter_dtype auto on a CPU with native bfloat16)."""
    drafter = small_drafter(steps=2, schedule="left_to_right", context_window=32,
                            matmul_dtype=matmul_dtype)
    contexts = [[5, 6, 7], list(range(1, 40)), [9]]
    temps = [0.0, 1.0, 0.5]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    together = drafter.draft(contexts, draft_len=6, temperatures=temps, generators=gens())
    for i, ctx in enumerate(contexts):
        alone = drafter.draft([ctx], draft_len=6, temperatures=[temps[i]], generators=[gens()[i]])
        if alone.probs is None:  # greedy alone: compare with a greedy twin below
            alone = drafter.draft([ctx, ctx], draft_len=6, temperatures=[0.0, 1.0])
        assert alone.tokens[0].tolist() == together.tokens[i].tolist()
        torch.testing.assert_close(alone.probs[0], together.probs[i], atol=1e-5, rtol=1e-4)


def test_context_longer_than_window_is_cut_not_an_error():
    drafter = small_drafter(steps=2, schedule="left_to_right", context_window=8)
    long_ctx = list(range(1, 100)) * 3
    a = drafter.draft([long_ctx], draft_len=4)
    b = drafter.draft([long_ctx[-8:]], draft_len=4)
    assert a.tokens.tolist() == b.tokens.tolist()


def test_all_greedy_batch_skips_q():
    drafter = small_drafter(steps=2, schedule="confidence", context_window=16)
    d = drafter.draft([[1, 2, 3], [4, 5]], draft_len=5)
    assert d.probs is None and d.drafted_greedily.all()
    mixed = drafter.draft([[1, 2, 3], [4, 5]], draft_len=5, temperatures=[0.0, 0.0001])
    assert mixed.tokens[0].tolist() == d.tokens[0].tolist()


def test_draft_probs_are_distributions_over_target_vocab_and_match_tokens():
    drafter = small_drafter(steps=3, schedule="left_to_right", context_window=16)
    d = drafter.draft([[1, 2, 3], [4, 5]], draft_len=5, temperatures=[0.0, 1.0])
    assert d.probs.shape == (2, 5, 100)  # mask column dropped
    torch.testing.assert_close(d.probs.sum(-1).cpu(), torch.ones(2, 5))
    assert (d.tokens < 100).all()
    # greedy row drafts the argmax of the q it reports
    assert d.tokens[0].tolist() == d.probs[0].argmax(-1).tolist()
    assert d.drafted_greedily.tolist() == [True, False]
    assert d.forward_passes == 3


def test_left_to_right_passes_report_the_q_of_the_pass_that_revealed_each_position():
    """At T > 1 a left-to-right pass scores only the positions it reveals; each
    position's q must still be softmax(logits / temperature) of the whole canvas as
    that pass saw it (the tokens revealed before, masks after), recomputed here with
    every position scored."""
    drafter = small_drafter(steps=3, schedule="left_to_right", context_window=16)
    contexts, temps = [[1, 2, 3], [4, 5, 6]], [1.0, 0.7]
    d = drafter.draft(contexts, draft_len=5, temperatures=temps)
    assert d.forward_passes == 3
    mask_id, start = drafter.mask_id, 0
    for size in (2, 2, 1):  # group_sizes(5, 3)
        canvas = torch.tensor(contexts, device=DEVICE)
        block = torch.full((2, 5), mask_id, device=DEVICE)
        block[:, :start] = d.tokens[:, :start]
        with torch.no_grad():
            logits = drafter.model(torch.cat((canvas, block), 1), num_last=5).float()
        q = torch.softmax(logits[..., :mask_id] / torch.tensor(temps, device=DEVICE)[:, None, None], -1)
        torch.testing.assert_close(d.probs[:, start : start + size], q[:, start : start + size])
        start += size


def test_seeded_drafts_are_reproducible():
    for schedule in ("left_to_right", "random", "confidence"):
        drafter = small_drafter(steps=3, schedule=schedule, context_window=16)
        runs = []
        for _ in range(2):
            gens = [torch.Generator().manual_seed(123), torch.Generator().manual_seed(7)]
            runs.append(drafter.draft([[1, 2, 3], [4, 5, 6]], draft_len=6, temperatures=[1.0, 1.0],
                                      generators=gens).tokens)
        assert torch.equal(runs[0], runs[1]), schedule


def test_random_schedule_that_reveals_everything_early_stops_there(monkeypatch):
    """The random schedule draws how many positions each step reveals; a draw can reveal
    all of them before the last step (likeliest with one row, as when prompt lookup
    leaves the MDLM a single request). The remaining steps then have nothing to do."""
    drafter = small_drafter(steps=3, schedule="random", context_window=16)
    monkeypatch.setattr(drafter, "_uniforms", lambda shape, generators: torch.zeros(
        shape, device=DEVICE))  # every uniform below the threshold: step 0 reveals all
    d = drafter.draft([[1, 2, 3]], draft_len=6)
    assert d.forward_passes == 1 and d.tokens.shape == (1, 6)


def test_left_to_right_sampling_draws_from_reported_q():
    """Each sampled token's frequency matches the q reported for it (T = gamma = 1)."""
    drafter = small_drafter(vocab=9, steps=1, schedule="left_to_right", context_window=8)
    ctx = [[1, 2, 3]] * 4000
    d = drafter.draft(ctx, draft_len=1, temperatures=[1.0] * 4000)
    q = d.probs[0, 0].cpu()
    freq = torch.bincount(d.tokens[:, 0].cpu(), minlength=8).float() / 4000
    assert (freq - q).abs().max() < 0.04


def test_resolve_drafter_errors_are_clear(tmp_path):
    with pytest.raises(DrafterNotFoundError, match="no such folder"):
        resolve_drafter(str(tmp_path / "missing"), target=str(tmp_path))
    with pytest.raises(DrafterNotFoundError, match="no MDLM drafter found for target"):
        resolve_drafter("mdlm", target=str(tmp_path))
    save_mdlm(small_mdlm(), tmp_path / "d")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "specdiff.json").write_text('{"drafter": "../d"}')
    assert resolve_drafter("mdlm", target=str(tmp_path / "t")) == str((tmp_path / "d").resolve())
    with pytest.raises(DrafterNotFoundError, match="the target's config could not be read"):
        resolve_drafter("mdlm", target=str(tmp_path))


def test_a_broken_cache_is_reported_not_treated_as_missing(monkeypatch):
    import huggingface_hub

    def denied(*args, **kwargs):
        raise PermissionError("[Errno 13] Permission denied: '/cache/models--org--drafter'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", denied)
    with pytest.raises(DrafterNotFoundError, match="reading it from the Hugging Face cache failed: "
                                                   r"\[Errno 13\] Permission denied"):
        resolve_drafter("org/drafter", target="unused")
