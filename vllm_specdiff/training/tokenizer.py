"""``specdiff-train tokenizer``: a byte-level BPE trained on the corpus, saved in
Hugging Face format so transformers and vLLM load it from a model folder."""

from __future__ import annotations

from pathlib import Path

from vllm_specdiff.training.data import EOS_TEXT, read_stories

# The story models have no chat tuning; this template lets /v1/chat/completions
# serve them: each message's text on its own line, then the model continues.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def train_tokenizer(corpus: str, out: str, vocab_size: int = 4096,
                    model_max_length: int = 512, max_stories: int | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    stories = read_stories(corpus, max_stories)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(stories, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TEXT, eos_token=EOS_TEXT, unk_token=EOS_TEXT,
        model_max_length=model_max_length,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    save_tokenizer(hf, out)
    return hf


def save_tokenizer(tokenizer, out: str) -> None:
    """save_pretrained, plus the files older readers expect: a tokenizer_config.json
    naming ``PreTrainedTokenizerFast`` (transformers 4 and 5 both load it) and a
    special_tokens_map.json."""
    import json

    Path(out).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("model_max_length", tokenizer.model_max_length)
    cfg.setdefault("add_bos_token", False)
    cfg.setdefault("add_eos_token", False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg.setdefault("chat_template", CHAT_TEMPLATE)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    special = {k: EOS_TEXT for k in ("bos_token", "eos_token", "unk_token")}
    (Path(out) / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def copy_tokenizer(tokenizer, out: str) -> None:
    save_tokenizer(tokenizer, out)
