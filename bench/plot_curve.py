"""Plot held-out exact match (and loss) against training step from one or more runs'
``metrics.jsonl`` (the trainer's ``kind=eval`` records).

    python bench/plot_curve.py runs/quickstart/metrics.jsonl:"lr 1e-3" other/metrics.jsonl \
        --out docs/exact_match_vs_step.png

Writes the PNG and a JSON with the plotted points next to it; prints the points as a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def eval_points(path: Path) -> list[dict]:
    by_step = {}  # a resumed run evaluates its last step again: keep the latest record
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval" and "exact_match" in record:
            by_step[record["step"]] = {"step": record["step"],
                                       "exact_match": record["exact_match"],
                                       "eval_loss": record.get("eval_loss")}
    return [by_step[s] for s in sorted(by_step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="metrics.jsonl[:label]")
    parser.add_argument("--out", default="exact_match_vs_step.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_em, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    data = {}
    for spec in args.runs:
        path, _, label = spec.partition(":")
        points = eval_points(Path(path))
        label = label or str(Path(path).parent.name)
        data[label] = points
        steps = [p["step"] for p in points]
        ax_em.plot(steps, [100 * p["exact_match"] for p in points], marker="o", label=label)
        ax_loss.plot(steps, [p["eval_loss"] for p in points], marker="o", label=label)
        print(f"{label}:")
        print(f"  {'step':>6}  {'exact match':>12}  {'held-out loss':>14}")
        for p in points:
            print(f"  {p['step']:>6}  {100 * p['exact_match']:>11.1f}%  {p['eval_loss']:>14.4f}")
    ax_em.set(xlabel="step", ylabel="held-out exact match (%)", ylim=(0, 100),
              title="Exact match vs step")
    ax_loss.set(xlabel="step", ylabel="held-out loss", title="Held-out loss vs step")
    for ax in (ax_em, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
