"""Fast tests of ``specdiff-train`` on tiny sizes (CPU, seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_specdiff.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "tinystories" / "tinystories_v1_train_head_2MiB.txt"
VALID = ROOT / "data" / "tinystories" / "tinystories_v1_valid_head.txt"

TINY_TARGET = ["--vocab-size", "300", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
               "--n-positions", "64", "--block-size", "32", "--batch-size", "4",
               "--warmup-steps", "2", "--device", "cpu", "--threads", "2", "--no-progress"]
TINY_DISTILL = ["--prompts", None, "--generator", "transformers", "--num-sequences", "8",
                "--new-tokens", "20", "--prompt-min", "2", "--prompt-max", "6",
                "--gen-batch-size", "8", "--batch-size", "4", "--warmup-steps", "2",
                "--device", "cpu", "--threads", "2", "--no-progress"]
TINY_MDLM = ["--hidden-dim", "32", "--n-blocks", "1", "--n-heads", "2", "--cond-dim", "16",
             "--model-length", "64", "--context-window", "12", "--gammas", "4,6"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    text = CORPUS.read_text(encoding="utf-8")
    stories = text.split("<|endoftext|>")[:60]
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("<|endoftext|>".join(stories), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("target") / "tiny-target"
    assert main(["target", "--corpus", str(corpus), "--out", str(out), "--max-steps", "3",
                 *TINY_TARGET]) == 0
    return out


def distill_args(corpus, target, out, *extra):
    args = [a if a is not None else str(corpus) for a in TINY_DISTILL]
    return ["--target", str(target), "--out", str(out), *args, *extra]


def test_target_loads_with_transformers(target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        assert (target / name).is_file(), name
    assert not (target / "checkpoint").exists()
    model = AutoModelForCausalLM.from_pretrained(target)
    tok = AutoTokenizer.from_pretrained(target)
    assert model.config.model_type == "gpt2"
    assert model.config.vocab_size == len(tok) == 300
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.model_max_length == 64
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 300)
    assert tok.decode(ids[0]) == "Once upon a time"


def test_eval_every_keeps_the_weights_with_the_lowest_development_perplexity(tmp_path, corpus,
                                                                           target):
    """Early stopping chooses on the development tokens (after the held-out slice) and
    saves the chosen weights; the held-out slice is only reported."""
    from transformers import GPT2LMHeadModel

    from vllm_specdiff.training.data import read_stories, token_stream
    from vllm_specdiff.training.target import TEST_BLOCK, TEST_TOKENS, perplexity
    from vllm_specdiff.training.tokenizer import load_tokenizer

    out = tmp_path / "early-stopped"
    # A learning rate this high makes later steps worse as often as better (with these
    # seeds the best weights are not the last, which the test checks).
    assert main(["target", "--corpus", str(corpus), "--valid", str(VALID), "--tokenizer",
                 str(target), "--out", str(out), "--max-steps", "6", "--eval-every", "2",
                 "--lr", "3.0", *TINY_TARGET]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    steps, ppls = zip(*summary["dev_curve"])
    assert steps == (2, 4, 6)
    assert summary["kept_step"] == steps[ppls.index(min(ppls))] != steps[-1]
    vstream = token_stream(load_tokenizer(str(target)), read_stories(VALID))
    saved = GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32)
    block = min(TEST_BLOCK, saved.config.n_positions)
    assert perplexity(saved, vstream[TEST_TOKENS:], block, "cpu") == pytest.approx(
        summary["dev_ppl"], rel=1e-3)
    assert perplexity(saved, vstream, block, "cpu", max_tokens=TEST_TOKENS) == \
        pytest.approx(summary["valid_ppl"], rel=1e-3)


def test_eval_every_must_be_a_positive_step_count(tmp_path, corpus, target):
    with pytest.raises(SystemExit, match="--eval-every must be at least 1"):
        main(["target", "--corpus", str(corpus), "--valid", str(VALID), "--tokenizer",
              str(target), "--out", str(tmp_path / "t"), "--max-steps", "2",
              "--eval-every", "0", *TINY_TARGET])


def test_tokenizer_subcommand(tmp_path, corpus):
    from transformers import AutoTokenizer

    assert main(["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "280", "--model-max-length", "128"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 280 and tok.model_max_length == 128
    assert tok.eos_token_id == 0


def test_drafter_writes_mdlm_layout(tmp_path, corpus, target):
    from vllm_specdiff.drafter import DiffusionDrafter
    from vllm_specdiff.loader import load_mdlm

    out = tmp_path / "tiny-mdlm"
    assert main(["drafter", *distill_args(corpus, target, out, "--max-steps", "3",
                                          "--kl-weight", "0.5"), *TINY_MDLM]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mdlm"
    assert config["vocab_size"] == 301  # target vocabulary + the mask token
    assert config["context_window"] == 12
    assert (out / "tokenizer.json").is_file()
    assert all(k.startswith("backbone.") for k in load_file(out / "model.safetensors"))
    model = load_mdlm(out)
    assert model.config.mask_token_id == 300
    draft = DiffusionDrafter(model, 2, "left_to_right", 12).draft([[5, 6, 7], [8]], 4)
    assert draft.tokens.shape == (2, 4) and int(draft.tokens.max()) < 300


def test_block_causal_drafter_with_the_streak_objective(tmp_path, corpus, target, capsys):
    from vllm_specdiff.loader import load_mdlm

    out = tmp_path / "bc-mdlm"
    assert main(["drafter", *distill_args(corpus, target, out, "--max-steps", "2",
                                          "--attention", "block_causal", "--streak", "sampled",
                                          "--streak-weight", "1.0"), *TINY_MDLM,
                 "--hidden-dim", "16"]) == 0  # narrower than the target: projected embeddings
    assert load_mdlm(out).config.attention == "block_causal"
    assert "output head (projected to width 16) initialised from the target" in capsys.readouterr().out


def test_all_spans_at_once_see_what_drafting_each_span_sees():
    """The span-tiling batch's forward gives each span the logits the drafter computes
    when drafting that span after its context: [context, noisy span], block-causal."""
    from vllm_specdiff.model import MDLM, MDLMConfig
    from vllm_specdiff.training.mdlm_objective import SpanTilingBatcher

    torch.manual_seed(0)
    model = MDLM(MDLMConfig(vocab_size=51, model_length=64, hidden_dim=32, cond_dim=16,
                            n_blocks=2, n_heads=2, time_conditioning=False,
                            attention="block_causal")).eval()
    for p in model.parameters():  # adaLN-Zero starts every block as identity: wake them
        torch.nn.init.normal_(p, std=0.1)
    seqs = [torch.randint(0, 50, (n,)) for n in (30, 34, 31)]
    batcher = SpanTilingBatcher(seqs, [5, 9, 3], mask_id=50, window=28, gammas=[4])
    batch = batcher.sample(3, torch.Generator().manual_seed(1))
    L = batch.canvas.shape[1] - batch.targets.shape[1]
    first = int(batch.positions[0, L])
    assert first >= 9 - (34 - 28)  # every row's spans lie in its continuation
    with torch.no_grad():
        tiled = model.backbone(batch.canvas, torch.zeros(3), batch.positions, batch.attn_mask,
                               batch.targets.shape[1])
        for r in range(3):
            for b in range(batch.targets.shape[1] // 4):
                start = first + 4 * b
                canvas = torch.cat([batch.canvas[r, :start], batch.canvas[r, L + 4 * b : L + 4 * b + 4]])
                alone = model(canvas[None], block_len=4)[0, -4:]
                torch.testing.assert_close(tiled[r, 4 * b : 4 * b + 4], alone, atol=1e-5, rtol=1e-4)
    # the noisy copy holds the clean tokens where they are not masked
    clean_spans = batch.canvas[:, first : first + batch.targets.shape[1]]
    assert torch.equal(batch.targets, clean_spans)
    noisy = batch.canvas[:, L:]
    assert torch.equal(noisy[~batch.masked], batch.targets[~batch.masked])
    assert bool((noisy[batch.masked] == 50).all())


def test_drafter_trains_on_all_spans(tmp_path, corpus, target):
    out = tmp_path / "bc-all-spans"
    assert main(["drafter", *distill_args(corpus, target, out, "--max-steps", "2",
                                          "--attention", "block_causal", "--all-spans",
                                          "--streak", "greedy", "--streak-weight", "1.0"),
                 *TINY_MDLM]) == 0
    assert json.loads((out / "config.json").read_text())["trained_on_all_spans"] is True
    with pytest.raises(SystemExit, match="--all-spans needs --attention block_causal"):
        main(["drafter", *distill_args(corpus, target, tmp_path / "bidi", "--max-steps", "1",
                                       "--all-spans"), *TINY_MDLM])


def test_drafters_distil_from_the_cached_teacher(tmp_path, corpus, target, capsys):
    """--kl-weight builds the target's top-k distributions once, beside the distillation
    data; the MDLM (every span at once) and the AR drafter then both train on it."""
    data = tmp_path / "distill.pt"
    assert main(["drafter", *distill_args(corpus, target, tmp_path / "kl", "--max-steps", "2",
                                          "--attention", "block_causal", "--all-spans",
                                          "--kl-weight", "1.0", "--teacher-top-k", "8",
                                          "--distill-data", str(data)), *TINY_MDLM]) == 0
    assert (tmp_path / "distill.teacher_top8.pt").is_file()
    assert "[teacher] top-8 distributions at" in capsys.readouterr().out
    assert main(["ar-drafter", *distill_args(corpus, target, tmp_path / "ar", "--max-steps", "2",
                                             "--kl-weight", "1.0", "--teacher-top-k", "8",
                                             "--distill-data", str(data)),
                 "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-positions", "64",
                 "--seq-len", "24"]) == 0
    assert "[teacher] loaded top-8 distributions" in capsys.readouterr().out


def test_teacher_rows_are_the_targets_distributions(target):
    """Row offsets[i] + t - 1 holds the target's top k after seq[:t], renormalised."""
    from transformers import AutoModelForCausalLM

    from vllm_specdiff.training.teacher import build_teacher, prediction_offsets

    model = AutoModelForCausalLM.from_pretrained(target).eval()
    seqs = [torch.randint(0, 300, (n,)).tolist() for n in (9, 4, 13)]
    teacher = build_teacher(model, seqs, k=5, batch_size=2, progress=False)
    offsets = prediction_offsets(seqs)
    assert teacher.ids.shape == (8 + 3 + 12, 5) and int(offsets[-1]) == 23
    for i, s in enumerate(seqs):
        for t in range(1, len(s)):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([s[:t]])).logits[0, -1], -1)
            top = logp.topk(5)
            row = int(offsets[i]) + t - 1
            assert torch.equal(teacher.ids[row].long(), top.indices)
            torch.testing.assert_close(teacher.logp[row].float(),
                                       torch.log_softmax(top.values, -1), atol=2e-3, rtol=0)


@pytest.mark.parametrize("all_spans", [False, True])
def test_batches_name_the_teacher_row_of_each_target(all_spans):
    """An oracle teacher whose top token at each row is the sequence's next token: the
    batch's pred_index must find every target token there."""
    from vllm_specdiff.training.mdlm_objective import DraftingBatcher, SpanTilingBatcher
    from vllm_specdiff.training.teacher import prediction_offsets

    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=gen) for n in (40, 33, 47, 36)]
    next_token = torch.cat([s[1:] for s in seqs])
    assert len(next_token) == int(prediction_offsets(seqs)[-1])
    cls = SpanTilingBatcher if all_spans else DraftingBatcher
    batcher = cls(seqs, [3, 8, 5, 1], mask_id=50, window=30, gammas=[4, 6])
    for _ in range(5):
        batch = batcher.sample(4, gen)
        assert torch.equal(next_token[batch.pred_index], batch.targets)


def test_expected_streak():
    from vllm_specdiff.training.mdlm_objective import expected_streak

    accept = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.5, 0.5]])
    masked = torch.tensor([[True, True, True], [False, True, True]])
    # row 0: 0.5 + 0.25 + 0.125; row 1: the revealed first token is given, 0.5 + 0.25
    torch.testing.assert_close(expected_streak(accept, masked), torch.tensor([0.875, 0.75]))


def test_ar_drafter_matches_mdlm_size(tmp_path, corpus, target):
    from transformers import AutoModelForCausalLM

    mdlm = tmp_path / "mdlm"
    data = tmp_path / "distill.pt"
    assert main(["drafter", *distill_args(corpus, target, mdlm, "--max-steps", "1",
                                          "--distill-data", str(data)), *TINY_MDLM]) == 0
    out = tmp_path / "ar"
    assert main(["ar-drafter", *distill_args(corpus, target, out, "--max-steps", "2",
                                             "--distill-data", str(data)),
                 "--mdlm", str(mdlm), "--n-embd", "32", "--n-head", "2",
                 "--n-positions", "64", "--seq-len", "32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 300


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_from_checkpoint(tmp_path, corpus, target, capsys):
    data = tmp_path / "distill.pt"
    full = tmp_path / "full"
    assert main(["drafter", *distill_args(corpus, target, full, "--max-steps", "6",
                                          "--distill-data", str(data)), *TINY_MDLM]) == 0
    part = tmp_path / "part"
    common = [*distill_args(corpus, target, part, "--max-steps", "6", "--distill-data",
                            str(data), "--checkpoint-every", "100"), *TINY_MDLM]
    # interrupted after 4 steps: a checkpoint, no model yet
    assert main(["drafter", *common, "--stop-after-steps", "4"]) == 0
    state = torch.load(part / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 4
    assert not (part / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["drafter", *common, "--resume"]) == 0
    assert "at step 4/6" in capsys.readouterr().out
    summary = json.loads((part / "training_summary.json").read_text())
    assert summary["step"] == 6
    # 4 steps + resume for 2 gives exactly the weights of 6 uninterrupted steps
    assert _same(_weights(full), _weights(part))


def test_resume_message(tmp_path, corpus, capsys):
    out = tmp_path / "t"
    args = ["target", "--corpus", str(corpus), "--out", str(out), "--max-steps", "4", *TINY_TARGET]
    assert main([*args, "--stop-after-steps", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "at step 2/4" in capsys.readouterr().out
    assert json.loads((out / "training_summary.json").read_text())["step"] == 4


def test_same_seed_same_weights(tmp_path, corpus):
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        assert main(["target", "--corpus", str(corpus), "--out", str(out), "--max-steps", "2",
                     "--seed", seed, *TINY_TARGET]) == 0
        runs[name] = _weights(out)
    assert _same(runs["a"], runs["b"])
    assert not _same(runs["a"], runs["c"])


def test_init_from_grows_a_model_without_changing_its_outputs(tmp_path, corpus, target):
    """--init-from: a deeper, longer GPT-2 grown from a trained one computes the same
    logits (repeated layers start as identity blocks), then trains on from there."""
    from transformers import GPT2LMHeadModel

    from vllm_specdiff.training.target import gpt2_config, grow_from

    source = GPT2LMHeadModel.from_pretrained(target).eval()
    grown = GPT2LMHeadModel(gpt2_config(300, 3, 32, 2, 128, 0)).eval()
    grow_from(grown, source)
    ids = torch.randint(0, 300, (2, 64))
    torch.testing.assert_close(grown(input_ids=ids).logits, source(input_ids=ids).logits)
    with pytest.raises(SystemExit, match="n_embd"):
        grow_from(GPT2LMHeadModel(gpt2_config(300, 3, 64, 2, 128, 0)), source)

    out = tmp_path / "grown"
    assert main(["target", "--corpus", str(corpus), str(corpus), "--out", str(out),
                 "--max-steps", "2", "--init-from", str(target), "--tokenizer", str(target),
                 *TINY_TARGET, "--n-layer", "3"]) == 0  # the last --n-layer wins
    assert json.loads((out / "config.json").read_text())["n_layer"] == 3


def test_a_narrower_drafter_starts_from_the_targets_principal_embedding_directions(target):
    """embeddings_of_width: same width -> the embeddings themselves; narrower -> their
    best rank-d approximation in d coordinates (inner products of a rank-d table kept
    exactly); wider -> one clear error."""
    from transformers import GPT2LMHeadModel

    from vllm_specdiff.training.distill import embeddings_of_width

    model = GPT2LMHeadModel.from_pretrained(target)
    emb = model.get_input_embeddings().weight.detach().float()
    torch.testing.assert_close(embeddings_of_width(model, 32), emb)
    with torch.no_grad():  # make the table rank 8: 8 coordinates then hold all of it
        low = torch.randn(emb.shape[0], 8) @ torch.randn(8, emb.shape[1])
        model.get_input_embeddings().weight.copy_(low)
    narrow = embeddings_of_width(model, 8)
    assert narrow.shape == (emb.shape[0], 8)
    torch.testing.assert_close(narrow @ narrow.T, low @ low.T, rtol=1e-3, atol=1e-3)
    with pytest.raises(SystemExit, match="wider"):
        embeddings_of_width(model, 64)
