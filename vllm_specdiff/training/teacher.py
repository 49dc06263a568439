"""The target as teacher, precomputed: its top-k next-token distribution at every
position of every distillation sequence, computed once and cached beside the data.

Distilling a drafter on the target's own continuations teaches it the target's
argmax (greedy rows) or one sample of its distribution (sampled rows). Speculative
sampling accepts a drafted token with probability sum_x min(p(x), q(x)), so a drafter
for sampled decoding must match the whole of p, not one sample of it; and for greedy
decoding the soft distribution carries more than the one token (which tokens the
target nearly chose). KL(p || q) to the target's distribution gives both.

Running the target beside the drafter at every training step would cost several
drafter steps per step (the target is ~10x the drafter); instead one forward pass per
sequence, before training, keeps the k most likely tokens at each position and their
log-probabilities (the tail beyond k is dropped and the top k renormalised, which
sharpens p where its tail is long: on `models/small-target`'s own continuations the
top 32 of 4096 tokens held 83% of the mass on average, under 56% at a tenth of the
positions; a larger k trades memory for a truer p). The
teacher conditions on the whole sequence from its first token, as the target does
when it verifies, even where the drafter's training row shows it fewer tokens.

Rows are addressed by ``prediction_offsets``: the distribution over token t (t >= 1)
of sequence i is row ``offsets[i] + t - 1``; ``offsets[-1]`` counts the rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


def prediction_offsets(sequences) -> torch.Tensor:
    """[n + 1]: the first teacher row of each sequence (a sequence of length n has
    n - 1 predicted tokens), then the number of rows."""
    counts = torch.tensor([max(0, len(s) - 1) for s in sequences], dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])


@dataclass
class TeacherTopK:
    ids: torch.Tensor  # [N, k] token ids (int16 where the vocabulary allows)
    logp: torch.Tensor  # [N, k] float16 log-probabilities, renormalised over the k
    k: int

    def gather(self, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` [...] -> ids [..., k] (long), probs [..., k] (float32)."""
        flat = index.reshape(-1).cpu()
        ids = self.ids[flat].long().reshape(*index.shape, self.k)
        probs = self.logp[flat].float().exp().reshape(*index.shape, self.k)
        return ids.to(device), probs.to(device)


@torch.no_grad()
def build_teacher(target, sequences, k: int, batch_size: int = 16, device="cpu",
                  progress: bool = True) -> TeacherTopK:
    """One forward pass of the (causal LM) target over every sequence."""
    from tqdm import tqdm

    offsets = prediction_offsets(sequences)
    n_rows = int(offsets[-1])
    vocab = target.get_input_embeddings().weight.shape[0]
    ids = torch.zeros(n_rows, k, dtype=torch.int16 if vocab <= 2 ** 15 else torch.int32)
    logp = torch.zeros(n_rows, k, dtype=torch.float16)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="teacher", disable=not progress, dynamic_ncols=True,
                    mininterval=2.0):
        L = max(len(sequences[i]) for i in idx) - 1
        x = torch.zeros(len(idx), L, dtype=torch.long)
        attn = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):  # right padding: positions stay 0..len-2
            s = torch.as_tensor(sequences[i][:-1], dtype=torch.long)
            x[r, : len(s)], attn[r, : len(s)] = s, 1
        out = target(input_ids=x.to(device), attention_mask=attn.to(device)).logits.float()
        top = torch.log_softmax(out, -1).topk(k, -1)
        top_logp = torch.log_softmax(top.values, -1).cpu()  # renormalised over the k
        top_ids = top.indices.cpu()
        for r, i in enumerate(idx):
            n, o = len(sequences[i]) - 1, int(offsets[i])
            ids[o : o + n] = top_ids[r, :n].to(ids.dtype)
            logp[o : o + n] = top_logp[r, :n].half()
    return TeacherTopK(ids, logp, k)


def fingerprint(sequences) -> int:
    """Identifies the sequences a cache was computed on (hashes of ints and tuples of
    ints do not change between runs)."""
    return hash(tuple(tuple(int(t) for t in s) for s in sequences)) & (2 ** 62 - 1)


def teacher_cache_path(distill_cache: Path, k: int) -> Path:
    return distill_cache.with_name(f"{distill_cache.stem}.teacher_top{k}.pt")


def load_or_build_teacher(target_path: str, data: dict, distill_cache: Path, k: int, device,
                          progress: bool = True) -> TeacherTopK:
    from vllm_specdiff.training.distill import load_target

    path = teacher_cache_path(distill_cache, k)
    if path.exists():
        state = torch.load(path, weights_only=True)
        if state["fingerprint"] == fingerprint(data["sequences"]):
            print(f"[teacher] loaded top-{k} distributions from {path}")
            return TeacherTopK(state["ids"], state["logp"], k)
        print(f"[teacher] {path} belongs to other sequences: rebuilding it")
    t0 = time.time()
    target = load_target(target_path, device)
    teacher = build_teacher(target, data["sequences"], k, device=device, progress=progress)
    del target
    torch.save({"ids": teacher.ids, "logp": teacher.logp,
                "fingerprint": fingerprint(data["sequences"]), "target": str(target_path)}, path)
    print(f"[teacher] top-{k} distributions at {teacher.ids.shape[0]} positions in "
          f"{time.time() - t0:.1f}s -> {path}")
    return teacher


def kl_to_teacher(logq: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the teacher's top k: logq [..., V'] (log-probs of the student,
    V' >= the target's vocabulary), ids/probs [..., k] -> [...]."""
    logq_k = logq.gather(-1, ids).clamp(min=-1e4)
    return (probs * (probs.clamp(min=1e-30).log() - logq_k)).sum(-1)


def acceptance_with_teacher(logq: torch.Tensor, ids: torch.Tensor,
                            probs: torch.Tensor) -> torch.Tensor:
    """sum_x min(p(x), q(x)) over the teacher's top k: speculative sampling's chance
    of accepting a token drawn from q (a lower bound by the dropped tail)."""
    return torch.minimum(probs, logq.gather(-1, ids).exp()).sum(-1)
