"""Projected speedup of SpecDiff and of AR-drafted speculation from measured parts.

    python benchmarks/project_speedup.py --parts benchmarks/results/gpu/<device>/results.jsonl \
        [--acceptance benchmarks/results/spec_bench.json] [--out DIR]

For every grid point (batch b, context c, draft length gamma, T denoising steps) of a
``gpu_check.py`` run:

    E(gamma)   = 1 + sum_{j <= gamma} a_j          expected tokens per target pass
    specdiff   = E * t_target(b, c, 1) / (t_target(b, c, gamma + 1) + t_mdlm(b, c, gamma, T) + t_verify(b, gamma))
    draft_model = E_ar * t_target(b, c, 1) / (t_target(b, c, gamma + 1) + t_ar(b, c, gamma) + t_verify(b, gamma))

where a_j is the per-position acceptance (the fraction of drafts whose position j was
accepted, vLLM's ``spec_decode_num_accepted_tokens_per_pos`` / drafts) and every t is a
measured median. Acceptance profiles come from two sources, never mixed:

- ``measured``: ours, through vLLM on this project's CPU pairs (``--acceptance``, written by
  ``benchmarks/spec_bench.py``); a profile measured at a draft length shorter than the
  grid's gamma counts the positions beyond it as 0 (an underestimate);
- ``paper``: the SpecDiff paper's reported mean accepted length for GPT-2 XL with MDLM-OWT
  (tau about 6 to 7.5, against about 5 for its AR drafter; Christopher et al., NAACL 2025)
  used directly as E; it reports no per-position profile and no T-by-gamma breakdown, so
  these rows use the paper's T = 4 (the low end of its T 4-6) and say so.

Assumptions (printed at the top of the output too): the target pass is transformers'
eager GPT-2 XL, not vLLM's (vLLM's would be faster, which lowers every speedup);
scheduling and sampling costs outside these parts are not counted; the verify time is
the fused kernel at vocab 50257. Writes projection.md and projection.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Christopher et al., "Speculative Diffusion Decoding", NAACL 2025 (GPT-2 XL target,
# MDLM-OWT drafter, OpenWebText, greedy): mean accepted length and headline speedups.
PAPER = {"specdiff_tau": (6.0, 7.5), "ar_tau": 5.0, "steps": 4,
         "speedup_vs_plain": 7.2, "speedup_vs_ar": 1.75}
PAPER_GAMMAS = (16, 32)  # its gamma 10-20 range, at the grid's draft lengths that hold tau 7.5


def load_parts(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    parts = defaultdict(dict)
    for r in rows:
        s = r["section"]
        if s == "target":
            parts["target"][(r["batch"], r["context"], r["new_tokens"])] = r["ms"]
        elif s == "drafter" and r["path"] == "greedy":
            parts["mdlm"][(r["batch"], r["context"], r["gamma"], r["steps"])] = r["ms"]
        elif s == "ar":
            parts["ar"][(r["batch"], r["context"], r["gamma"])] = r["ms"]
        elif s == "verify" and r["vocab"] == max(x["vocab"] for x in rows if x["section"] == "verify"
                                                 and x["vocab"] <= 50257):
            parts["verify"][(r["batch"], r["gamma"])] = r["fused_ms"]
    return parts


def verify_ms(parts: dict, batch: int, gamma: int) -> float:
    """The fused kernel's time at the nearest measured (batch, gamma) (0 if none measured)."""
    if not parts["verify"]:
        return 0.0
    key = min(parts["verify"], key=lambda k: (abs(k[0] - batch), abs(k[1] - gamma)))
    return parts["verify"][key]


def expected_tokens(per_position: list[float], gamma: int) -> float:
    return 1.0 + sum(per_position[:gamma])


def load_profiles(path: Path | None) -> tuple[dict, str]:
    """Best measured per-position profile of each method -> ({method: [a_j]}, provenance)."""
    if path is None or not path.exists():
        return {}, "none given"
    data = json.loads(path.read_text())
    best = {}
    for p in data["profiles"]:
        if p.get("temperature", 0) != 0 or p.get("batch", 1) != 1:
            continue
        method = "specdiff" if p["method"] == "specdiff" else p["method"]
        if method not in ("specdiff", "draft_model"):
            continue
        tau = 1 + sum(p["per_position"])
        if method not in best or tau > best[method][0]:
            best[method] = (tau, p)
    provenance = f"{path.name} (commit {data.get('commit', '?')}, `{data.get('command', '?')}`)"
    return {m: p for m, (_, p) in best.items()}, provenance


def project(parts: dict, profiles: dict) -> list[dict]:
    rows = []
    for (batch, context, gamma, steps), mdlm_ms in sorted(parts["mdlm"].items()):
        plain = parts["target"].get((batch, context, 1))
        verify_pass = parts["target"].get((batch, context, gamma + 1))
        ar_ms = parts["ar"].get((batch, context, gamma))
        if plain is None or verify_pass is None:
            continue
        kernel = verify_ms(parts, batch, gamma)
        base = dict(batch=batch, context=context, gamma=gamma, steps=steps, plain_ms=plain,
                    verify_pass_ms=verify_pass, mdlm_ms=mdlm_ms, ar_ms=ar_ms, kernel_ms=kernel)
        specdiff_step = verify_pass + mdlm_ms + kernel
        ar_step = None if ar_ms is None else verify_pass + ar_ms + kernel
        if "specdiff" in profiles:
            e = expected_tokens(profiles["specdiff"]["per_position"], gamma)
            rows.append({**base, "source": "measured", "method": "specdiff", "E": e,
                         "speedup": e * plain / specdiff_step})
        if "draft_model" in profiles and ar_step is not None and steps == 1:
            e = expected_tokens(profiles["draft_model"]["per_position"], gamma)
            rows.append({**base, "source": "measured", "method": "draft_model", "E": e,
                         "speedup": e * plain / ar_step})
        if gamma in PAPER_GAMMAS and steps == PAPER["steps"]:
            for tau in PAPER["specdiff_tau"]:
                rows.append({**base, "source": f"paper tau {tau}", "method": "specdiff", "E": tau,
                             "speedup": tau * plain / specdiff_step})
        if gamma in PAPER_GAMMAS and ar_step is not None and steps == 1:
            rows.append({**base, "source": f"paper tau {PAPER['ar_tau']}", "method": "draft_model",
                         "E": PAPER["ar_tau"], "speedup": PAPER["ar_tau"] * plain / ar_step})
    return rows


def best_by_batch(rows: list[dict], context: int) -> dict:
    """(source, method) -> {batch: best row at this context}."""
    best = defaultdict(dict)
    for r in rows:
        if r["context"] != context:
            continue
        key = (r["source"], r["method"])
        if r["batch"] not in best[key] or r["speedup"] > best[key][r["batch"]]["speedup"]:
            best[key][r["batch"]] = r
    return best


def report(rows: list[dict], parts_path: Path, provenance: str, env: dict) -> str:
    contexts = sorted({r["context"] for r in rows})
    lines = ["# Projected speedup from measured parts", "",
             f"Command: `python benchmarks/project_speedup.py {' '.join(sys.argv[1:])}`  ",
             f"Parts: `{parts_path}` ({env.get('device', '?')}, commit {env.get('commit', '?')}, "
             f"`{env.get('command', '?')}`)  ", f"Measured acceptance: {provenance}", "",
             "Assumptions:",
             "- speedup = E * t_target(1 token) / (t_target(gamma + 1 tokens) + drafter time + verify "
             "kernel), every t a measured median at the same batch and context;",
             "- target = transformers' GPT-2 XL shape with a KV cache, not vLLM's (vLLM's pass is faster, "
             "which would lower every speedup here); scheduling and sampling outside these parts are not "
             "counted;",
             "- `measured` E = 1 + sum of the per-position acceptance measured through vLLM on this "
             "project's CPU pairs at batch 1, greedy; positions past the measured draft length count 0;",
             f"- `paper` E = the SpecDiff paper's mean accepted length ({PAPER['specdiff_tau'][0]}-"
             f"{PAPER['specdiff_tau'][1]} for MDLM-OWT, {PAPER['ar_tau']} for its AR drafter), at its "
             f"T = {PAPER['steps']} and gamma in {list(PAPER_GAMMAS)}; the paper reports up to "
             f"{PAPER['speedup_vs_plain']}x over plain decoding and {PAPER['speedup_vs_ar']}x over AR "
             "speculation (A100, greedy).", ""]
    for context in contexts:
        best = best_by_batch(rows, context)
        batches = sorted({b for v in best.values() for b in v})
        lines += [f"## Context {context}: best projected speedup over plain decoding per batch", "",
                  "| acceptance | method | " + " | ".join(f"b={b}" for b in batches) + " |",
                  "|---|---|" + "---:|" * len(batches)]
        for (source, method), per_batch in sorted(best.items()):
            cells = []
            for b in batches:
                r = per_batch.get(b)
                cells.append("-" if r is None else
                             f"{r['speedup']:.2f}x (g{r['gamma']}" + (f" T{r['steps']})" if method == "specdiff" else ")"))
            lines.append(f"| {source} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Every grid point", "",
              "| source | method | batch | context | gamma | T | E | plain ms | verify pass ms | drafter ms | kernel ms | speedup |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        drafter = r["mdlm_ms"] if r["method"] == "specdiff" else r["ar_ms"]
        lines.append(f"| {r['source']} | {r['method']} | {r['batch']} | {r['context']} | {r['gamma']} | "
                     f"{r['steps'] if r['method'] == 'specdiff' else '-'} | {r['E']:.2f} | {r['plain_ms']:.2f} | "
                     f"{r['verify_pass_ms']:.2f} | {drafter:.2f} | {r['kernel_ms']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    context = max(r["context"] for r in rows)
    best = best_by_batch(rows, context)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (source, method), per_batch in sorted(best.items()):
        batches = sorted(per_batch)
        ax.plot(batches, [per_batch[b]["speedup"] for b in batches], marker="o",
                linestyle="-" if method == "specdiff" else "--", label=f"{method} ({source})")
    ax.axhline(PAPER["speedup_vs_plain"], color="grey", linestyle=":",
               label=f"paper: {PAPER['speedup_vs_plain']}x vs plain")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("projected speedup over plain decoding")
    ax.set_title(f"Projected from measured parts, context {context} "
                 f"(paper: {PAPER['speedup_vs_ar']}x vs AR speculation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "projection.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", required=True, help="results.jsonl of a gpu_check.py run")
    ap.add_argument("--acceptance", default=str(ROOT / "benchmarks" / "results" / "spec_bench.json"),
                    help="per-position acceptance measured through vLLM (spec_bench.py's JSON)")
    ap.add_argument("--out", default=None, help="output folder (default: beside --parts)")
    args = ap.parse_args(argv)
    parts_path = Path(args.parts)
    out = Path(args.out) if args.out else parts_path.parent
    out.mkdir(parents=True, exist_ok=True)
    env_path = parts_path.parent / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    profiles, provenance = load_profiles(Path(args.acceptance) if args.acceptance else None)
    rows = project(load_parts(parts_path), profiles)
    if not rows:
        print("no grid point has target, drafter and verification timings", file=sys.stderr)
        return 1
    (out / "projection.md").write_text(report(rows, parts_path, provenance, env))
    png = plot(rows, out)
    print(f"wrote {out / 'projection.md'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
