"""Shared fixtures: small models the tests create, and vLLM engines kept in-process.

Engines start in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): faster to start and
to close, and a test can reach the live proposer. Each test module builds its
engines once (module-scoped fixtures) and closes them before the next module.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from vllm_specdiff.runtime import close_engine  # noqa: E402,F401 (shared by the tests)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
# Another pair can be tested with SPECDIFF_TEST_TARGET / SPECDIFF_TEST_DRAFTER.
TARGET = Path(os.environ.get("SPECDIFF_TEST_TARGET", MODELS / "tiny-target"))
DRAFTER = Path(os.environ.get("SPECDIFF_TEST_DRAFTER", MODELS / "tiny-mdlm"))
AR_DRAFTER = MODELS / "tiny-ar-drafter"
BLOCK_CAUSAL_DRAFTER = MODELS / "tiny-mdlm-block-causal"
GPT2_TOKENIZER = Path(__file__).parent / "assets" / "gpt2_tokenizer"

# Varied prompts: story openings, dialogue, lists, odd spacing, very short ones.
PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom and his dog went to the park. They",
    "One day, a big red ball",
    "The sun was hot and the sky was blue.",
    "\"Can I play too?\" asked the little bird.",
    "Mom said, \"Time for bed!\" But Tim",
    "Once",
    "There was a cat who liked to eat fish. Every day",
    "Sara had three toys: a car, a doll and",
    "The old tree in the garden was very tall. One morning",
    "Ben wanted to fly like a bird, so he",
    "It was raining.  The children",
    "A little fish swam in the sea. It saw",
    "Lucy found a shiny key under her bed.",
    "The dragon was sad because",
    "Max and Mia built a big sand castle. Then a wave",
]


def greedy_token_ids(llm, prompts, max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation of exactly max_tokens tokens."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def engine_kwargs(**overrides):
    kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                  disable_log_stats=False, gpu_memory_utilization=0.3)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="session")
def random_gpt2_pair(tmp_path_factory):
    """Random-init GPT-2-tokenizer target and an MDLM drafter in the mdlm-owt
    layout (vocab 50257 + mask = 50258), small widths so they are quick."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from vllm_specdiff.loader import save_mdlm
    from vllm_specdiff.model import MDLM, MDLMConfig

    out = tmp_path_factory.mktemp("random_gpt2_pair")
    torch.manual_seed(0)
    tok = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER))
    tok.model_max_length = 1024
    target = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=512, n_embd=64,
                                        n_layer=2, n_head=2))
    target.save_pretrained(out / "target")
    tok.save_pretrained(out / "target")
    drafter = MDLM(MDLMConfig(vocab_size=50258, model_length=256, hidden_dim=64,
                              cond_dim=32, n_blocks=2, n_heads=2))
    save_mdlm(drafter, out / "mdlm")
    return out / "target", out / "mdlm"
