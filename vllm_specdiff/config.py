"""SpecDiff settings: parsed from vLLM's ``speculative_config`` and validated at engine start.

Users write ``{"method": "specdiff", "model": DRAFTER, "num_speculative_tokens": 8,
"diffusion_steps": 2, ...}``. Every key is checked here, so a bad value fails the
engine start with one message that names the setting and its allowed range. The
validated ``SpecDiffConfig`` object itself travels to the proposer inside vLLM's
``additional_config`` (a NamedTuple, so vLLM's JSON hash of that dict accepts it).
"""

from __future__ import annotations

from typing import NamedTuple

from vllm_specdiff.schedules import SCHEDULES

METHOD = "specdiff"
MAX_GAMMA = 64
DRAFTER_DTYPES = ("auto", "float32", "bfloat16", "float16")
WARMUP_METHODS = ("none", "ngram", "specdiff")
DRAFTER_CACHES = ("auto", "exact", "approximate", "off")
PROMPT_LOOKUP = (2, 8)  # default n-gram sizes (min, max) copied from the context
NULL_MEANS_SOMETHING = ("context_window", "draft_temperature")  # whole context; follow requests
ADDITIONAL_CONFIG_KEY = "specdiff"  # where the settings travel in vLLM's additional_config


class SpecDiffConfigError(ValueError):
    """A specdiff setting is missing or out of range."""


class SpecDiffConfig(NamedTuple):
    """What the user can set; the field names are the speculative_config keys."""

    # Drafter: a folder in the mdlm-owt layout, a cached HF repo id, or 'mdlm'.
    model: str = "mdlm"
    # gamma: the most draft tokens per request per step, 1..64.
    num_speculative_tokens: int = 8
    # T: denoising steps (drafter forward passes) per proposal, 1..gamma. 1 by default:
    # on both embedded pairs a second pass costs more than the acceptance it adds
    # (benchmarks/results/spec_bench.md, pair_bench_small_gamma_steps.md), and q then
    # is the drafter's output buffer itself.
    diffusion_steps: int = 1
    # Which masked positions each step reveals: left_to_right | random | confidence.
    schedule: str = "left_to_right"
    # W: the drafter sees the last W context tokens (longer contexts are cut); null:
    # the whole context, up to the drafter's model_length - gamma. Without the drafter
    # cache each pass costs W + gamma tokens; with it, gamma plus the tokens new since
    # the request's last step, whatever W. auto (the default): the W the drafter's
    # config.json names (``draft_context_window``; 16 where it names none): drafters
    # trained on short windows accept more with 16 tokens than with the whole context
    # (benchmarks/results/context_bench.md), drafters trained on whole prefixes
    # (``specdiff-train drafter --all-spans``) more with all of their training window
    # (benchmarks/results/pair_bench_small_drafters_all-spans.md), and fail beyond it
    # (benchmarks/results/context_bench_small.md).
    context_window: int | str | None = "auto"
    # Keep each request's context keys and values between steps (drafter_cache.py):
    # exact (block-causal drafters) | approximate (bidirectional drafters, refreshed
    # every cache_refresh_steps steps) | off (re-encode the last W tokens every pass) |
    # auto (exact for block-causal drafters, off for bidirectional ones).
    drafter_cache: str = "auto"
    cache_refresh_steps: int = 4
    # auto | float32 | bfloat16 | float16. auto: the target's dtype, except that a
    # float32 drafter on a CPU with native bfloat16 multiplies (AVX512-BF16, AMX) keeps
    # its linear weights in bfloat16 (loader.drafter_dtypes). Exact whatever the dtype;
    # a bfloat16 drafter's q shifts slightly with batch padding, so its seeded sampled
    # requests reproduce only when batched alike.
    drafter_dtype: str = "auto"
    # None: draft at each request's own temperature (greedy requests draft argmax).
    draft_temperature: float | None = None
    # Choose each step's draft length from measured goodput (adaptive.py); 0 = no drafting.
    adaptive: bool = True
    # The first N generated tokens of a request are drafted by `warmup_method` (meant
    # for very short contexts; benchmarks/results/warmup.md compares the choices).
    warmup_tokens: int = 8
    # none (no speculation) | ngram (prompt lookup) | specdiff, for warm-up tokens.
    warmup_method: str = "ngram"
    # Prompt lookup beside the MDLM: a request whose last n tokens (prompt_lookup_min <=
    # n <= prompt_lookup_max) occurred earlier in its context drafts the tokens that
    # followed them (vLLM's n-gram proposer, verified as a point mass) instead of the
    # MDLM's draft; the MDLM drafts the other requests. Copying costs microseconds and
    # wins where the output repeats its context (summaries, RAG, a looping target).
    # While the controller keeps the MDLM off, a request copies after any match (n >= 1):
    # its alternative is a step for one token. prompt_lookup_min 0: the MDLM drafts
    # every request.
    prompt_lookup_min: int = PROMPT_LOOKUP[0]
    prompt_lookup_max: int = PROMPT_LOOKUP[1]
    # Filled at engine start (the resolved drafter folder), not by users.
    drafter_path: str = ""

    @property
    def gamma(self) -> int:
        return self.num_speculative_tokens

    def window_for(self, drafter_config) -> int | None:
        """W for this drafter (an ``MDLMConfig``): 'auto' resolved; None = whole context."""
        if self.context_window == "auto":
            return drafter_config.draft_context_window
        return self.context_window

    def drafter_window(self, drafter_config, max_model_len: int) -> int:
        """The W the drafter runs with: ``window_for`` (the whole context when None),
        leaving the drafter's ``model_length`` room for the draft block, and no longer
        than the engine's ``max_model_len``."""
        return min(self.window_for(drafter_config) or drafter_config.model_length,
                   drafter_config.model_length - self.gamma, max_model_len)

    def uses_drafter_cache(self, drafter_config) -> bool:
        """'approximate' caches any drafter; 'auto' and 'exact' cache block-causal ones
        (exactly); 'off' none."""
        return self.drafter_cache == "approximate" or (
            self.drafter_cache != "off" and drafter_config.attention == "block_causal")

    @classmethod
    def from_user(cls, settings: dict) -> "SpecDiffConfig":
        """Validate the user's speculative_config dict (``method`` already 'specdiff')."""
        allowed = set(cls._fields) - {"drafter_path"}
        unknown = sorted(set(settings) - allowed - {"method"})
        if unknown:
            raise SpecDiffConfigError(
                f"speculative_config: unknown setting(s) {unknown} for method "
                f"'specdiff'; allowed: {sorted(allowed | {'method'})}"
            )
        # null means "the default" except where null is itself a value.
        values = {k: v for k, v in settings.items()
                  if k != "method" and (v is not None or k in NULL_MEANS_SOMETHING)}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise SpecDiffConfigError(
                f"speculative_config.{name}={getattr(self, name)!r} is invalid for "
                f"method 'specdiff': {allowed}"
            )

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.num_speculative_tokens) or not 1 <= self.num_speculative_tokens <= MAX_GAMMA:
            fail("num_speculative_tokens", f"gamma must be an integer in [1, {MAX_GAMMA}]")
        if not is_int(self.diffusion_steps) or not 1 <= self.diffusion_steps <= self.gamma:
            fail("diffusion_steps",
                 f"T must be an integer in [1, num_speculative_tokens={self.gamma}]")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {list(SCHEDULES)}")
        if self.context_window not in (None, "auto") and (
                not is_int(self.context_window) or self.context_window < 1):
            fail("context_window", "W must be an integer >= 1, null for the whole context, "
                 "or 'auto' for the drafter's own")
        if self.drafter_cache not in DRAFTER_CACHES:
            fail("drafter_cache", f"must be one of {list(DRAFTER_CACHES)}")
        if not is_int(self.cache_refresh_steps) or self.cache_refresh_steps < 1:
            fail("cache_refresh_steps", "must be an integer >= 1 (drafting steps between "
                 "re-encodings of an approximate cache)")
        if self.drafter_dtype not in DRAFTER_DTYPES:
            fail("drafter_dtype", f"must be one of {list(DRAFTER_DTYPES)}")
        if self.draft_temperature is not None and not (
            isinstance(self.draft_temperature, (int, float))
            and not isinstance(self.draft_temperature, bool)
            and 0.0 <= self.draft_temperature <= 10.0
        ):
            fail("draft_temperature", "must be null (follow each request) or a number in [0, 10]")
        if not isinstance(self.adaptive, bool):
            fail("adaptive", "must be true or false")
        if not is_int(self.warmup_tokens) or self.warmup_tokens < 0:
            fail("warmup_tokens", "must be an integer >= 0")
        if self.warmup_method not in WARMUP_METHODS:
            fail("warmup_method", f"must be one of {list(WARMUP_METHODS)}")
        if not is_int(self.prompt_lookup_min) or self.prompt_lookup_min < 0:
            fail("prompt_lookup_min", "must be an integer >= 0 (the shortest n-gram copied "
                 "from the context; 0 = the MDLM drafts every request)")
        if not is_int(self.prompt_lookup_max) or not (
                max(1, self.prompt_lookup_min) <= self.prompt_lookup_max <= MAX_GAMMA):
            fail("prompt_lookup_max", "must be an integer in [max(1, prompt_lookup_min="
                 f"{self.prompt_lookup_min}), {MAX_GAMMA}] (the longest n-gram matched)")
        if not isinstance(self.model, str) or not self.model:
            fail("model", "the drafter: a folder, a cached Hugging Face repo id, or 'mdlm'")
