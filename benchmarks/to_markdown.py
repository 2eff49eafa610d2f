"""Turns pytest-benchmark JSON into a markdown table.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/to_markdown.py bench.json > table.md

Columns: group, name (the provider), mean in ms, the ratio to the group's baseline peer (named
by extra_info["baseline"]: `sdpa`, `torch-fused`, `torch`, `plain`, `hf`), given as a speed-up
(baseline mean / this mean: above 1 is faster than the peer), and the other extra_info entries.
Groups keep the order in which they ran; within a group rows go from fastest to slowest.
The machine line and any skipped benchmarks (with their reasons) come before and after.
"""

from __future__ import annotations

import argparse
import json
import sys

HIDDEN = {"provider", "baseline"}


def fmt(value) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def machine_line(info: dict) -> str:
    parts = [info.get("cpu_model") or info.get("cpu", {}).get("brand_raw", "")]
    if info.get("cpu_count"):
        parts.append(f"{info['cpu_count']} cores")
    if info.get("torch_threads"):
        parts.append(f"{info['torch_threads']} torch threads")
    if info.get("cpu_flags"):
        parts.append(f"flags {info['cpu_flags']}")
    if info.get("cuda_device"):
        parts.append(f"GPU {info['cuda_device']}")
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    if info.get("python_version"):
        parts.append(f"Python {info['python_version']}")
    return ", ".join(p for p in parts if p)


def table(data: dict) -> str:
    groups: dict[str, list] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or "(none)", []).append(b)
    lines = ["| group | name | mean ms | x baseline | extra_info |",
             "|---|---|---:|---:|---|"]
    for group, rows in groups.items():
        means = {b["name"]: b["stats"]["mean"] for b in rows}
        for b in sorted(rows, key=lambda b: b["stats"]["mean"]):
            extra = b.get("extra_info", {})
            base = extra.get("baseline")
            if base and base in means:
                ratio = f"{means[base] / b['stats']['mean']:.2f}"
                if b["name"] == base:
                    ratio += " (baseline)"
            else:
                ratio = ""
            info = ", ".join(f"{k}={fmt(v)}" for k, v in extra.items() if k not in HIDDEN)
            lines.append(f"| {group} | {b['name']} | {b['stats']['mean'] * 1e3:.2f} | {ratio} "
                         f"| {info} |")
    return "\n".join(lines)


def render(data: dict) -> str:
    out = []
    machine = machine_line(data.get("machine_info", {}))
    if machine:
        out.append(f"Machine: {machine}.")
    if data.get("datetime"):
        out.append(f"Run: {data['datetime']}" + (f", commit {data['commit_info']['id'][:10]}"
                                                  f"{' (dirty)' if data['commit_info'].get('dirty') else ''}"
                                                  if data.get("commit_info", {}).get("id") else "") + ".")
    out.append("")
    out.append(table(data))
    skipped = data.get("skipped") or []
    if skipped:
        out.append("")
        out.append("Skipped:")
        for s in skipped:
            reason = s["reason"].removeprefix("Skipped: ")
            out.append(f"- `{s['test']}`: {reason}")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="file written by pytest --benchmark-json")
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        text = render(json.load(f))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
