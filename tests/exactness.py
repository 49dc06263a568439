"""The exact output distribution of the target, and the chi-square test against it
(shared by tests/test_sampling_exact.py and tests/test_tensor_parallel.py)."""

from __future__ import annotations

import collections

import torch
from conftest import TARGET

PROMPT = "Once upon a time, there was a little"
NUM_SAMPLES = 6000
ALPHA = 1e-3
MIN_EXPECTED = 5.0


def constrained_log_softmax(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log p of vLLM's sampler: logits / temperature, then top-p as vLLM applies it
    (ascending sort; tokens whose cumulative probability is <= 1 - top_p are dropped,
    the most likely token always kept)."""
    logits = logits / temperature
    if top_p < 1.0:
        ordered, index = logits.sort(dim=-1, descending=False)
        cum = ordered.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        logits = logits.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
    return torch.log_softmax(logits, -1)


def exact_joint(prompt: str, prefixes, temperature: float = 1.0,
                top_p: float = 1.0) -> dict[tuple[int, ...], float]:
    """p(prefix) * p(next | prefix) for every observed prefix (tuples of generated
    tokens, all of one length) and every next token, under the sampling settings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TARGET))
    model = AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    prefixes = sorted(prefixes)
    k = len(prefixes[0])
    suffix = torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), k)
    n = ids.shape[1]
    with torch.no_grad():  # in chunks: long prompts x many prefixes x V would not fit
        logp = torch.cat([
            constrained_log_softmax(
                model(torch.cat([ids.repeat(len(chunk), 1), chunk], dim=1))
                .logits[:, n - 1:].double(), temperature, top_p)
            for chunk in suffix.split(64)])
    joint = {}  # logp row j predicts generated token j
    for row, prefix in enumerate(prefixes):
        logp_prefix = sum(float(logp[row, j, t]) for j, t in enumerate(prefix))
        nxt = torch.exp(logp[row, k] + logp_prefix)
        for t in torch.nonzero(nxt > 1e-12).flatten().tolist():
            joint[(*prefix, t)] = float(nxt[t])
    return joint


def chi_square_pvalue(counts: collections.Counter, probs: dict, n: int) -> tuple[float, int]:
    """Cells with expected count >= MIN_EXPECTED stand alone; the rest (and all
    mass of t1 values never observed) is pooled into one 'other' cell."""
    stat, cells = 0.0, 0
    other_obs, other_exp = n, n * 1.0
    for cell, p in probs.items():
        expected = n * p
        if expected >= MIN_EXPECTED:
            observed = counts.get(cell, 0)
            stat += (observed - expected) ** 2 / expected
            other_obs -= observed
            other_exp -= expected
            cells += 1
    if other_exp >= MIN_EXPECTED:
        stat += (other_obs - other_exp) ** 2 / other_exp
        cells += 1
    dof = cells - 1
    pvalue = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                           torch.tensor(stat / 2.0, dtype=torch.float64)))
    return pvalue, dof


def pvalues(samples, prompt=PROMPT, temperature: float = 1.0, top_p: float = 1.0,
            depths=(2, 3)) -> list[tuple[float, int]]:
    """Chi-square p-value and degrees of freedom for (t1, t2) and (t1, t2, t3)."""
    out = []
    for depth in depths:
        counts = collections.Counter(s[:depth] for s in samples)
        probs = exact_joint(prompt, {c[:-1] for c in counts}, temperature, top_p)
        out.append(chi_square_pvalue(counts, probs, len(samples)))
    return out
