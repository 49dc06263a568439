"""Text corpora for training: stories split on ``<|endoftext|>`` (or blank lines),
tokenized into one stream with EOS between stories, sampled as random windows."""

from __future__ import annotations

import re
from pathlib import Path

import torch

EOS_TEXT = "<|endoftext|>"


def read_stories(path: str | Path, max_stories: int | None = None) -> list[str]:
    """Stories of a TinyStories-style file: ``<|endoftext|>`` separated if the file
    has separators, else blank-line separated paragraphs."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if EOS_TEXT in text:
        parts = text.split(EOS_TEXT)
    else:
        parts = re.split(r"\n\s*\n", text)
    stories = [p.strip() for p in parts if p.strip()]
    return stories[:max_stories] if max_stories else stories


def tokenize_stories(tokenizer, stories: list[str]) -> list[list[int]]:
    enc = tokenizer(stories, add_special_tokens=False)["input_ids"]
    return [list(e) for e in enc]


def token_stream(tokenizer, stories: list[str]) -> torch.Tensor:
    """All stories as one int64 stream, each followed by EOS."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for ids in tokenize_stories(tokenizer, stories):
        out.extend(ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, length] windows of the stream starting at random offsets."""
    starts = torch.randint(0, len(stream) - length, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(length)[None]
    return stream[idx]


def held_out_prompts(tokenizer, path: str | Path, n: int, prompt_tokens: int,
                     min_tokens: int = 64, skip: int = 1) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of the first ``n`` stories (paragraphs) of
    ``path`` that have at least ``min_tokens`` tokens. ``skip`` drops the first
    paragraphs (the valid file starts mid-story)."""
    prompts = []
    for story in read_stories(path)[skip:]:
        ids = tokenizer(story, add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            prompts.append(list(ids[:prompt_tokens]))
            if len(prompts) == n:
                break
    return prompts
