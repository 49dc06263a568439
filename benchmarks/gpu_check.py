"""The GPU pack: one prepared run of every SpecDiff part on a lent GPU, written to one folder.

    python benchmarks/gpu_check.py --out OUT_DIR     # an H100/H200: under 8 minutes
    python benchmarks/gpu_check.py --smoke           # toy sizes on the CPU, under a minute

Needs torch, Triton and transformers, not vLLM. Sections, in order (each prints its rows as
it goes and appends them to ``results.jsonl`` at once, so a timeout still leaves what ran):

1. ``tests``   the kernel and drafter tests on the device (compiled Triton, the kernel's
               10^6-draw chi-square): pytest with SPECDIFF_TEST_DEVICE=cuda -> unit_tests.log
2. ``copy``    device-to-device copy bandwidth (read + write), the roofline of verification
3. ``verify``  the fused verification kernel vs its PyTorch reference vs the unfused
               (vLLM 0.32-structured) path: batch x gamma x vocab, bandwidth as a fraction
               of the copy's; vLLM's own RejectionSampler is not timed here (no vLLM)
4. ``drafter`` the MDLM drafter at the real ``kuleshov-group/mdlm-owt`` size (random init in
               its exact layout, bf16, SDPA) through ``DiffusionDrafter`` (the plugin's code
               path): ms per proposal, greedy and sampled (q computed); plus one forward
               pass eager vs replayed from a CUDA graph (the denoising loop itself branches
               on data, so only the pass is graphed). There is no cached drafter yet.
5. ``target``  a GPT-2 XL-shaped target (transformers, bf16, SDPA, KV cache): ms for 1 and
               gamma + 1 new tokens, the stand-in for vLLM's target pass (vLLM's own, with
               paged attention and CUDA graphs, would be faster)
6. ``ar``      a GPT-2 small-shaped AR drafter with an incremental KV cache: ms for gamma
               greedy steps (the ``draft_model`` baseline)

Files in the output folder: env.json, results.jsonl, summary.md, unit_tests.log.
``benchmarks/project_speedup.py`` turns results.jsonl into the projected speedup.
Random weights everywhere: only time is measured. Timing follows the device tool's
method: warm-up, CUDA events per call, median of repeats, the card's clocks as found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


@dataclass
class Grid:
    """Sizes of one run; ``FULL`` is the paper's setting, ``SMOKE`` toy sizes for the CPU."""

    verify_batches: list[int]
    verify_gammas: list[int]
    vocabs: list[int]
    batches: list[int]
    gammas: list[int]
    steps: list[int]
    contexts: list[int]
    mdlm: dict = field(default_factory=dict)  # MDLMConfig fields
    target: dict = field(default_factory=dict)  # GPT2Config fields
    ar: dict = field(default_factory=dict)
    iters: int = 10
    warmup: int = 3
    test_select: str = ""  # pytest -k expression ("" = all)


FULL = Grid(
    verify_batches=[1, 8, 32, 64, 256], verify_gammas=[4, 8, 16], vocabs=[32000, 50257, 128256],
    batches=[1, 8, 32, 64], gammas=[8, 16, 32], steps=[1, 2, 4, 8], contexts=[128, 512, 1024],
    # kuleshov-group/mdlm-owt: 12 blocks, 768 wide, 12 heads, cond 128, vocab 50257 + mask.
    mdlm=dict(vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12,
              n_heads=12, dropout=0.0),
    # GPT-2 XL: 48 x 1600, 25 heads; n_positions raised from 1024 so that a 1024-token
    # context plus gamma + 1 new tokens fits (only the position table grows).
    target=dict(vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1088),
    ar=dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1088),
)
SMOKE = Grid(
    verify_batches=[1, 4], verify_gammas=[4], vocabs=[1000], batches=[1, 2], gammas=[4],
    steps=[1, 2], contexts=[16],
    mdlm=dict(vocab_size=1001, model_length=64, hidden_dim=32, cond_dim=16, n_blocks=2,
              n_heads=2, dropout=0.0),
    target=dict(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                bos_token_id=0, eos_token_id=0),
    ar=dict(vocab_size=1000, n_embd=32, n_layer=1, n_head=2, n_positions=64,
            bos_token_id=0, eos_token_id=0),
    iters=2, warmup=1, test_select="gamma1 or seeded",
)


class Run:
    """The output folder, the clock and the device of one gpu_check run."""

    def __init__(self, out: Path, budget_s: float, grid: Grid):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = out / "results.jsonl"
        self.results.write_text("")
        self.deadline = time.monotonic() + budget_s
        self.grid = grid
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.skipped: list[str] = []

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, what: str) -> bool:
        if self.left_s() > 0:
            return False
        self.skipped.append(what)
        print(f"  out of time: skipped {what}", flush=True)
        return True

    def record(self, section: str, **row) -> None:
        row = {"section": section, **row}
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("  " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def time_ms(self, fn, iters: int | None = None, before=None) -> float:
        """Median ms of fn() over repeats after warm-up; ``before()`` runs untimed
        before each call (e.g. to cut a KV cache back)."""
        iters = iters or self.grid.iters
        for _ in range(self.grid.warmup):
            if before:
                before()
            fn()
        times = []
        for _ in range(iters):
            if before:
                before()
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


# -- 1. tests ---------------------------------------------------------------------------

def run_tests(run: Run) -> None:
    env = dict(os.environ, SPECDIFF_TEST_DEVICE=run.device.type)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_fused_verify.py"), str(ROOT / "tests" / "test_drafter.py")]
    if run.grid.test_select:
        cmd += ["-k", run.grid.test_select]
    timeout = max(30.0, min(240.0, run.left_s() / 2))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMED OUT after {timeout:.0f} s", -1
    (run.out / "unit_tests.log").write_text(" ".join(cmd) + "\n\n" + log)
    tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    run.record("tests", device=run.device.type, returncode=rc, seconds=round(time.monotonic() - t0, 1),
               summary=tail[0])


# -- 2-3. copy bandwidth and verification ---------------------------------------------------

def copy_bandwidth(run: Run) -> float:
    nbytes = (1 << 30) if run.cuda else (1 << 24)
    src = torch.randn(nbytes // 4, device=run.device)
    dst = torch.empty_like(src)
    ms = run.time_ms(lambda: dst.copy_(src))
    gbs = 2 * nbytes / (ms * 1e-3) / 1e9
    run.record("copy", bytes=nbytes, ms=ms, gbs=gbs)
    return gbs


def run_verify(run: Run, copy_gbs: float) -> None:
    from benchmarks.bench_verify import make_inputs
    from vllm_specdiff.kernels import fused_verify as fv

    for vocab in run.grid.vocabs:
        for gamma in run.grid.verify_gammas:
            for batch in run.grid.verify_batches:
                if run.out_of_time(f"verify b={batch} g={gamma} V={vocab}"):
                    return
                inputs = make_inputs(torch, batch, gamma, vocab, 0.7, 0.0, True, False, run.device, 0)
                args = list(inputs.values())
                block_v = fv.default_block_v(vocab)
                paths = {"fused": lambda: fv.fused_verify(*args, block_v=block_v),
                         "reference": lambda: fv.fused_verify_reference(*args),
                         "unfused": lambda: fv.unfused_verify(*args)}
                ref_out, ref_acc = fv.fused_verify_reference(*args)
                fused_out, fused_acc = paths["fused"]()
                differ = int(((fused_out != ref_out).any(1) | (fused_acc != ref_acc)).sum())
                ms = {name: run.time_ms(fn) for name, fn in paths.items()}
                moved = fv.bytes_moved(ref_out, ref_acc, inputs["cu_num_draft"], inputs["is_greedy"],
                                       vocab, True, True, block_v=block_v)
                gbs = moved["fused"] / (ms["fused"] * 1e-3) / 1e9
                run.record("verify", batch=batch, gamma=gamma, vocab=vocab,
                           fused_ms=ms["fused"], reference_ms=ms["reference"], unfused_ms=ms["unfused"],
                           fused_bytes=moved["fused"], fused_gbs=gbs, fraction_of_copy=gbs / copy_gbs,
                           speedup_vs_unfused=ms["unfused"] / ms["fused"],
                           accepted_per_request=float(ref_acc.float().mean()), requests_differ=differ)


# -- 4. drafter --------------------------------------------------------------------------------

def run_drafter(run: Run) -> None:
    from vllm_specdiff.drafter import DiffusionDrafter
    from vllm_specdiff.model import MDLM, MDLMConfig

    torch.manual_seed(0)
    config = MDLMConfig(**run.grid.mdlm)
    model = MDLM(config).to(device=run.device, dtype=run.dtype).eval().requires_grad_(False)
    # adaLN-Zero starts as the identity; perturb so the passes compute real values.
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    model.backbone.freeze_conditioning()
    vocab = config.vocab_size - 1
    run.record("drafter_model", params=sum(p.numel() for p in model.parameters()),
               dtype=str(run.dtype), **run.grid.mdlm)
    for context in run.grid.contexts:
        for batch in run.grid.batches:
            contexts = torch.randint(0, vocab, (batch, context)).tolist()
            for gamma in run.grid.gammas:
                window = min(context, config.model_length - gamma)
                if run.out_of_time(f"drafter ctx={context} b={batch} g={gamma}"):
                    return
                graphed_pass(run, model, batch, window, gamma)
                for steps in run.grid.steps:
                    if steps > gamma:
                        continue
                    drafter = DiffusionDrafter(model, steps=steps, schedule="left_to_right",
                                               context_window=window)
                    for path, temperature in (("greedy", 0.0), ("sampled", 1.0)):
                        temps = [temperature] * batch
                        ms = run.time_ms(lambda: drafter.draft(contexts, gamma, temps))
                        run.record("drafter", batch=batch, context=window, gamma=gamma, steps=steps,
                                   path=path, ms=ms)


def graphed_pass(run: Run, model, batch: int, window: int, gamma: int) -> None:
    """One drafter pass over [window context, gamma masks]: eager and, on CUDA, replayed
    from a captured graph (what a graphed drafter would pay per denoising step)."""
    ids = torch.randint(0, model.config.vocab_size - 1, (batch, window + gamma), device=run.device)
    positions = torch.arange(window + gamma, device=run.device).expand(batch, -1).contiguous()

    def forward():
        return model(ids, positions=positions, num_last=gamma)

    with torch.inference_mode():
        eager = run.time_ms(forward)
        graph_ms = None
        if run.cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward()
            graph_ms = run.time_ms(graph.replay)
    run.record("drafter_pass", batch=batch, context=window, gamma=gamma, eager_ms=eager, graph_ms=graph_ms)


# -- 5-6. target and AR drafter ---------------------------------------------------------------

def gpt2(run: Run, section: str, fields: dict):
    """A random-init GPT-2 of the given shape, recorded as ``<section>_model``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**fields, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).to(device=run.device, dtype=run.dtype).eval().requires_grad_(False)
    run.record(f"{section}_model", params=sum(p.numel() for p in model.parameters()),
               dtype=str(run.dtype), **fields)
    return model


def prefilled_grid(run: Run, model, section: str):
    """(context, batch, KV cache holding `context` random tokens per request, the last
    token) over the grid; stops when the run is out of time."""
    from transformers import DynamicCache

    for context in run.grid.contexts:
        for batch in run.grid.batches:
            if run.out_of_time(f"{section} ctx={context} b={batch}"):
                return
            ids = torch.randint(0, model.config.vocab_size, (batch, context + 1), device=run.device)
            cache = DynamicCache()
            model.transformer(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
            yield context, batch, cache, ids[:, -1:]
            del cache  # one grid point's cache alive at a time


def run_target(run: Run) -> None:
    model = gpt2(run, "target", run.grid.target)
    new_tokens = [1] + [g + 1 for g in run.grid.gammas]
    with torch.inference_mode():
        for context, batch, cache, last in prefilled_grid(run, model, "target"):
            for n in new_tokens:
                ids = last.expand(batch, n).contiguous()
                ms = run.time_ms(lambda: model(input_ids=ids, past_key_values=cache, use_cache=True),
                                 before=lambda: cache.crop(context))
                run.record("target", batch=batch, context=context, new_tokens=n, ms=ms)
            del cache


def run_ar(run: Run) -> None:
    model = gpt2(run, "ar", run.grid.ar)

    def propose(cache, last, gamma):
        token = last
        for _ in range(gamma):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
        return token

    with torch.inference_mode():
        for context, batch, cache, last in prefilled_grid(run, model, "ar"):
            for gamma in run.grid.gammas:
                ms = run.time_ms(lambda: propose(cache, last, gamma), before=lambda: cache.crop(context))
                run.record("ar", batch=batch, context=context, gamma=gamma, ms=ms)
            del cache


# -- environment and summary -------------------------------------------------------------------

def environment(run: Run, argv: list[str]) -> dict:
    import transformers
    import triton

    env = {
        "command": "python benchmarks/gpu_check.py " + " ".join(argv),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if run.cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "dtype": str(run.dtype),
        "cpu_threads": torch.get_num_threads(),
    }
    if run.cuda:
        env["clocks"] = _nvidia_smi("clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu")
    return env


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _nvidia_smi(query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "nvidia-smi unavailable"


def summary(run: Run, env: dict) -> str:
    rows = [json.loads(line) for line in run.results.read_text().splitlines() if line]
    lines = [f"# gpu_check on {env['device']}", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ", f"Date: {env['date']}  ",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"{env['dtype']}; clocks as found: {env.get('clocks', '-')!r}", ""]
    for r in rows:
        if r["section"] == "tests":
            lines += [f"Tests on {r['device']}: return code {r['returncode']}, `{r['summary']}`", ""]
        if r["section"] == "copy":
            lines += [f"Copy bandwidth (read + write): {r['gbs']:.0f} GB/s", ""]
    verify = [r for r in rows if r["section"] == "verify"]
    if verify:
        lines += ["## Verification (ms per call; fused bandwidth as a fraction of the copy's)", "",
                  "| vocab | gamma | batch | fused | reference | unfused | fused GB/s | of copy | vs unfused | differ |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['vocab']} | {r['gamma']} | {r['batch']} | {r['fused_ms']:.3f} | {r['reference_ms']:.3f} | "
                  f"{r['unfused_ms']:.3f} | {r['fused_gbs']:.0f} | {100 * r['fraction_of_copy']:.0f}% | "
                  f"{r['speedup_vs_unfused']:.2f}x | {r['requests_differ']} |" for r in verify]
        lines.append("")
    drafter = [r for r in rows if r["section"] == "drafter"]
    if drafter:
        lines += ["## MDLM drafter (ms per proposal)", "",
                  "| context | batch | gamma | T | greedy | sampled |", "|---:|---:|---:|---:|---:|---:|"]
        keyed = {(r["context"], r["batch"], r["gamma"], r["steps"], r["path"]): r["ms"] for r in drafter}
        for c, b, g, t, path in keyed:
            if path == "greedy":
                lines.append(f"| {c} | {b} | {g} | {t} | {keyed[(c, b, g, t, path)]:.2f} | "
                             f"{_cell(keyed.get((c, b, g, t, 'sampled')))} |")
        lines.append("")
    passes = [r for r in rows if r["section"] == "drafter_pass"]
    if passes:
        lines += ["## One drafter pass: eager vs CUDA graph (ms)", "",
                  "| context | batch | gamma | eager | graph |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['context']} | {r['batch']} | {r['gamma']} | {r['eager_ms']:.2f} | "
                  f"{_cell(r['graph_ms'])} |" for r in passes]
        lines.append("")
    for section, title, key in (("target", "Target, GPT-2 XL shape (ms per forward)", "new_tokens"),
                                ("ar", "AR drafter, GPT-2 small shape (ms per gamma greedy steps)", "gamma")):
        sel = [r for r in rows if r["section"] == section]
        if sel:
            lines += [f"## {title}", "", f"| context | batch | {key} | ms |", "|---:|---:|---:|---:|"]
            lines += [f"| {r['context']} | {r['batch']} | {r[key]} | {r['ms']:.2f} |" for r in sel]
            lines.append("")
    if run.skipped:
        lines += ["## Skipped (out of time)", ""] + [f"- {s}" for s in run.skipped] + [""]
    return "\n".join(lines)


SECTIONS = ("tests", "verify", "drafter", "target", "ar")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes (runs on the CPU in under a minute)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/gpu/<device>)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new measurements after this many seconds (default 420; smoke 50)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = ap.parse_args(argv)
    grid = SMOKE if args.smoke else FULL
    budget = args.budget_s or (50.0 if args.smoke else 420.0)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        ap.error("no CUDA device: the full run needs a GPU (use --smoke on a CPU)")
    if not cuda:  # the smoke run interprets the kernel; set before triton is imported
        os.environ["TRITON_INTERPRET"] = "1"
    name = torch.cuda.get_device_name() if cuda else "cpu-smoke"
    out = Path(args.out or ROOT / "benchmarks" / "results" / "gpu" / "".join(
        c if c.isalnum() or c in "._-" else "_" for c in name))
    run = Run(out, budget, grid)
    env = environment(run, argv)
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(f"gpu_check: {env['device']}, {env['dtype']}, budget {budget:.0f} s -> {out}", flush=True)
    copy_gbs = None
    for section in args.sections:
        print(f"[{section}] {run.left_s():.0f} s left", flush=True)
        if section == "tests":
            run_tests(run)
        elif section == "verify":
            copy_gbs = copy_gbs or copy_bandwidth(run)
            run_verify(run, copy_gbs)
        elif section == "drafter":
            run_drafter(run)
        elif section == "target":
            run_target(run)
        elif section == "ar":
            run_ar(run)
        (out / "summary.md").write_text(summary(run, env))  # after each section: partial results
    print(f"wrote {out}/summary.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
