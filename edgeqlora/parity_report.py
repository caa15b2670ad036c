"""The parity report as people read it: ``parity.md`` (a table per candidate) and
``parity.png`` (bars against the thresholds). ``edgeqlora.parity`` measures and gates."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(report: Mapping[str, Any]) -> str:
    th = report["thresholds"]
    ref = report["reference"]["task"]
    lines = [
        "# Parity report",
        "",
        f"Reference: `{report['settings']['reference']}` (trained "
        f"{report['settings'].get('reference_base', 'NF4')} base + adapter, torch). "
        f"Task: {ref['examples']} held-out examples from `{ref['source']}`; text: "
        f"{report['settings']['text_tokens']} tokens of `edgeqlora/assets/english.txt`. Machine: "
        f"{report['machine']['platform']}, {report['machine']['cpu_count']} CPUs.",
        "",
        f"Thresholds (task and text each): mean KLD <= {th['max_kld']}"
        + (f", p99 KLD <= {th['max_p99_kld']}" if "max_p99_kld" in th else "")
        + f", top-1 >= {th['min_top1']}, perplexity ratio <= {th['max_ppl_ratio']}"
        + (f", exact-match retention >= {th['min_exact_match_ratio']}"
           if "min_exact_match_ratio" in th else "") + ".",
        "",
        "| model | mean KLD | p99 KLD | top-1 | ppl ratio | task KLD | text KLD | exact match "
        "| identical answers | exact match with schema | valid JSON without → with | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| reference | - | - | - | 1.0000 | - | - | {ref['exact_match']:.3f} | "
        f"{ref['examples']}/{ref['examples']} | - | - | - |",
    ]
    for name, c in report["candidates"].items():
        a, t = c["all"], c["task"]
        k = t.get("constrained")
        with_schema = ("-", "-") if not k else (
            f"{k['exact_match']:.3f}",
            f"{k['valid_json_unconstrained']:.3f} → {k['valid_json']:.3f}")
        verdict = "pass" if not report["failures"][name] else "FAIL"
        lines.append(
            f"| {name} | {_fmt(a['mean_kld'])} | {_fmt(a['p99_kld'])} | {_fmt(a['top1'])} | "
            f"{_fmt(a['ppl_ratio'])} | {_fmt(t.get('mean_kld', float('nan')))} | "
            f"{_fmt(c['text'].get('mean_kld', float('nan')))} | {t['exact_match']:.3f} | "
            f"{t['identical_answers']}/{t['examples']} | {with_schema[0]} | {with_schema[1]} "
            f"| {verdict} |")
    if any(c["task"].get("constrained") for c in report["candidates"].values()):
        lines += ["", "With schema: the same greedy answers decoded under the export's JSON "
                  "schema (`schema.json`); reported, not gated: the gate reads the "
                  "unconstrained answers, so the constraint cannot hide a worse model."]
    for name, problems in report["failures"].items():
        if problems:
            lines += ["", f"**{name} fails:** " + "; ".join(problems) + "."]
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Bar chart per candidate: mean KLD, top-1, perplexity ratio, exact match (with the
    thresholds and the reference's exact match as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["candidates"])
    th = report["thresholds"]
    cands = report["candidates"]
    panels = [
        ("mean KLD (lower is better)", [cands[n]["all"]["mean_kld"] for n in names],
         th["max_kld"], "max"),
        ("top-1 agreement", [cands[n]["all"]["top1"] for n in names], th["min_top1"], "min"),
        ("perplexity ratio", [cands[n]["all"]["ppl_ratio"] for n in names],
         th["max_ppl_ratio"], "max"),
        ("task exact match", [cands[n]["task"]["exact_match"] for n in names],
         report["reference"]["task"]["exact_match"], "reference"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(4 + 1.6 * 4 * max(1, len(names)) ** 0.5, 3.6))
    for ax, (title, values, line, kind) in zip(axes, panels):
        colors = ["#d62728" if report["failures"][n] else "#2ca02c" for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.axhline(line, color="black", linestyle="--", linewidth=1, label=kind)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("edgeqlora parity: export vs trained model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
