"""Online serving: `vllm serve` per method, driven by vLLM's own `vllm bench serve`.

    python benchmarks/serve_bench.py            # concurrency 1, 8, 32; 3 repeats (~15 min here)
    python benchmarks/serve_bench.py --quick    # concurrency 1 and 8, shorter outputs

One server per method (none, specdiff, ngram, draft_model) on 127.0.0.1, all started
first (each with --max-num-seqs 32); then, for each repeat and concurrency, `vllm bench
serve` runs against each server in turn (interleaved), on the Spec-Bench file with each
prompt cut to its last 256 target tokens (the embedded target has a 512-token context),
128 greedy output tokens (ignore_eos), 3 x concurrency prompts (at least 8), no chat
template.
Reported per method and concurrency (median [min-max] over repeats): output tokens/s,
requests/s, TTFT and TPOT/ITL p50 and p99. ngram and draft_model use their best gamma at
batch 1 greedy from benchmarks/results/spec_bench.json when it exists (else 4); specdiff
its pinned defaults. Results: benchmarks/results/serve_bench[_quick].{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.spec_bench import (RESULTS, SPEC_BENCH, draft_model, environment,  # noqa: E402
                                   ngram, specdiff)
from vllm_specdiff.runtime import EMBEDDED_TARGET, prepare_process  # noqa: E402

VLLM = Path(sys.executable).parent / "vllm"
METRICS = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")


def best_gammas() -> dict[str, int]:
    """ngram / draft_model gamma with the best batch-1 greedy tokens/s in spec_bench.json."""
    best = {"ngram": 4, "draft_model": 4}
    path = RESULTS / "spec_bench.json"
    if path.exists():
        cells = json.loads(path.read_text())["cells"]
        for family in best:
            pool = [c for c in cells if c["family"] == family and c["batch"] == 1
                    and c["temperature"] == 0]
            if pool:
                top = max(pool, key=lambda c: statistics.median(c["tokens_per_s"]))
                best[family] = top["config"]["num_speculative_tokens"]
    return best


def truncated_spec_bench(folder: Path, prompt_tokens: int) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_TARGET))
    out = folder / "spec_bench_truncated.jsonl"
    with open(out, "w") as f:
        for line in SPEC_BENCH.read_text().splitlines():
            row = json.loads(line)
            ids = tokenizer(row["turns"][0], add_special_tokens=False)["input_ids"][-prompt_tokens:]
            f.write(json.dumps({**row, "turns": [tokenizer.decode(ids)]}) + "\n")
    return out


class Server:
    def __init__(self, name: str, speculative_config: dict | None, port: int, log_dir: Path):
        self.name, self.port = name, port
        cmd = [str(VLLM), "serve", str(EMBEDDED_TARGET), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "32",
               "--enforce-eager", "--seed", "0"]
        if speculative_config:
            cmd += ["--speculative-config", json.dumps(speculative_config)]
        self.log = open(log_dir / f"server_{port}.log", "w")
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"server {self.name} not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def bench(server: Server, dataset: Path, concurrency: int, output_len: int, result: Path) -> dict:
    num_prompts = max(3 * concurrency, 8)
    cmd = [str(VLLM), "bench", "serve", "--backend", "vllm", "--base-url",
           f"http://127.0.0.1:{server.port}", "--model", str(EMBEDDED_TARGET),
           "--dataset-name", "spec_bench", "--dataset-path", str(dataset),
           "--spec-bench-output-len", str(output_len), "--num-prompts", str(num_prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--skip-chat-template",
           "--temperature", "0",
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
           "--num-warmups", "2", "--seed", "0", "--disable-tqdm", "--save-result",
           "--result-dir", str(result.parent), "--result-filename", result.name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    data = json.loads(result.read_text())
    return {k: data.get(k) for k in METRICS} | {"completed": data.get("completed"),
                                                 "num_prompts": num_prompts}


def report(rows: list[dict], env: dict, args, methods) -> str:
    concurrencies = sorted({r["concurrency"] for r in rows})
    lines = ["# Online serving: `vllm serve` driven by `vllm bench serve`", "",
             f"Command: `{env['command']}`  ",
             f"Commit: {env['commit']}  ", f"Date: {env['date']}  ",
             f"Machine: {env['cpu']}, {env['cores']} cores; vLLM {env['vllm']} (CPU), float32  ",
             f"Workload: Spec-Bench prompts (last {args.prompt_tokens} tokens), {args.output_len} greedy output "
             f"tokens (ignore_eos), 3 x concurrency prompts (at least 8), {args.repeats} interleaved "
             "repeats; servers with --max-num-seqs 32. Cells: median [min-max].", ""]
    for concurrency in concurrencies:
        lines += [f"## Concurrency {concurrency}", "",
                  "| method | output tok/s | speedup | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
                  "TPOT p99 ms | ITL p50 ms | ITL p99 ms |", "|---|" + "---|" * 9]
        base = [r for r in rows if r["method"] == "none" and r["concurrency"] == concurrency]
        for name in methods:
            sel = [r for r in rows if r["method"] == name and r["concurrency"] == concurrency]
            if not sel:
                continue

            def cell(key, digits=1, sel=sel):
                vals = [r[key] for r in sel if r[key] is not None]
                if not vals:
                    return "-"
                return f"{statistics.median(vals):.{digits}f} [{min(vals):.{digits}f}-{max(vals):.{digits}f}]"

            ratios = [r["output_throughput"] / b["output_throughput"] for r, b in zip(sel, base)]
            lines.append(f"| {name} | {cell('output_throughput', 0)} | {statistics.median(ratios):.2f}x "
                         f"[{min(ratios):.2f}-{max(ratios):.2f}] | {cell('request_throughput', 2)} | "
                         + " | ".join(cell(k) for k in METRICS[2:]) + " |")
        lines.append("")
    lines += ["## Server settings", ""] + [f"- `{n}`: `{json.dumps(c)}`" for n, c in methods.items()]
    return "\n".join(lines) + "\n"


def plot(rows, methods, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in methods:
        sel = sorted({r["concurrency"] for r in rows if r["method"] == name})
        tput = [statistics.median(r["output_throughput"] for r in rows
                                  if r["method"] == name and r["concurrency"] == c) for c in sel]
        tpot = [statistics.median(r["median_tpot_ms"] for r in rows
                                  if r["method"] == name and r["concurrency"] == c) for c in sel]
        axes[0].plot(sel, tput, marker="o", label=name)
        axes[1].plot(sel, tpot, marker="o", label=name)
    for ax, label in zip(axes, ("output tokens/s", "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--port", type=int, default=18400)
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be at least 3")
    prepare_process(quiet=True)
    args.concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    args.output_len = args.output_len or (64 if args.quick else 128)
    gammas = best_gammas()
    methods = {"none": None,
               "specdiff": specdiff(8, 2).speculative_config,
               f"ngram g{gammas['ngram']}": ngram(gammas["ngram"]).speculative_config,
               f"draft_model g{gammas['draft_model']}": draft_model(gammas["draft_model"]).speculative_config}
    env = environment("serve_bench.py", sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = truncated_spec_bench(tmp, args.prompt_tokens)
        servers = [Server(name, config, args.port + i, tmp) for i, (name, config) in enumerate(methods.items())]
        try:
            for s in servers:
                s.wait_ready()
                print(f"server {s.name} ready on port {s.port}", flush=True)
            for rep in range(args.repeats):
                for concurrency in args.concurrency:
                    for s in servers:
                        time.sleep(0.5)
                        r = bench(s, dataset, concurrency, args.output_len, tmp / f"{s.port}_{rep}_{concurrency}.json")
                        rows.append({"method": s.name, "concurrency": concurrency, "repeat": rep, **r})
                        print(f"rep {rep + 1} c={concurrency} {s.name}: {r['output_throughput']:.0f} tok/s, "
                              f"TPOT p50 {r['median_tpot_ms']:.1f} ms", flush=True)
        finally:
            for s in servers:
                s.stop()
    stem = "serve_bench_quick" if args.quick else "serve_bench"
    (RESULTS / f"{stem}.md").write_text(report(rows, env, args, methods))
    (RESULTS / f"{stem}.json").write_text(json.dumps({**env, "settings": vars(args), "methods": methods,
                                                      "rows": rows}, indent=1) + "\n")
    plot(rows, methods, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.md/.json/.png")


if __name__ == "__main__":
    main()
