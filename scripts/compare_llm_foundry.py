#!/usr/bin/env python3
"""Side-by-side llm-foundry vs icl accuracies on the same rows, with differences.

Inputs: the JSON of `scripts/llm_foundry_eval.py` and an icl `results.json` (`tasks[NAME].acc`, `.n`,
and for has_categories tasks `tasks[NAME].categories[CAT].{acc, n}`; NAME is `label/N-shot`). Any
Python 3 runs it (standard library only).

    scripts/compare_llm_foundry.py --foundry ~/.cache/icl/foundry/results.json \
        --icl target/foundry-check/results.json --tolerance 0.0101 \
        [--foundry-samples ~/.cache/icl/foundry/samples.jsonl --icl-samples target/foundry-check/samples.jsonl]

Exit status 1 when a task or category is missing on the icl side, its `n` differs, or its accuracy
differs by more than `--tolerance`; 2 on unreadable input. Which icl field is compared: `acc_mean_nll`
for multiple_choice and schema tasks when present (llm-foundry's InContextLearningMultipleChoiceAccuracy
picks the lowest mean per-token NLL, Composer's rule, which icl reports as acc_mean_nll), else `acc`;
`--icl-field TYPE=FIELD` overrides it. With both sample files, rows whose outcome differs are counted
and the first few listed.

The icl command lines that evaluate the same capped rows (`--print-icl-commands` prints them for a
given foundry JSON; WORK is its `work_dir`, which holds `tasks.yaml`, `gauntlet.yaml` and the capped
JSONL files under llm-foundry's relative paths):

    cargo build --release -p icl-cli
    target/release/icl eval --model ~/.cache/icl/models/smollm2-135m-instruct-hf \
        --suite WORK/tasks.yaml --data-dir WORK \
        --output target/foundry-check/results.json --log-samples target/foundry-check/samples.jsonl
    scripts/compare_llm_foundry.py --foundry FOUNDRY.json --icl target/foundry-check/results.json

(`smollm2-135m-instruct` holds the same GGUF weights in icl's own import; the -hf folder is the very
one llm-foundry loaded.) The gauntlet: WORK/gauntlet.yaml is llm-foundry's gauntlet cut to the run
benchmarks; append its `eval_gauntlet` block to a copy of tasks.yaml to have icl score it too.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

CHOICE_TYPES = ("multiple_choice", "schema")


def fail(msg: str) -> None:
    print(f"compare_llm_foundry: {msg}", file=sys.stderr)
    sys.exit(2)


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path}: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        fail(f"{path}: expected a JSON object with a 'tasks' object")
    return data


def load_samples(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        fail(f"{path}:{line_no}: {e}")
    except OSError as e:
        fail(f"{path}: {e}")
    return rows


def icl_fields(specs: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for spec in specs:
        kind, sep, field = spec.partition("=")
        if not sep or not field:
            fail(f"--icl-field {spec!r}: expected TYPE=FIELD")
        fields[kind] = field
    return fields


def pick_field(kind: str, entry: dict[str, Any], overrides: dict[str, str]) -> str:
    if kind in overrides:
        return overrides[kind]
    if kind in CHOICE_TYPES and "acc_mean_nll" in entry:
        return "acc_mean_nll"
    return "acc"


def icl_correct(sample: dict[str, Any], field: str) -> int | None:
    """One icl sample's 0/1 outcome under the compared field, from its samples.jsonl line."""
    for key in ("correct", "is_greedy"):
        if key in sample:
            return None if sample[key] is None else int(sample[key])
    if "logliks" in sample and "gold" in sample:
        ll = sample["logliks"]
        if field == "acc_mean_nll" and isinstance(sample.get("n_tokens"), list):
            ll = [x / max(n, 1) for x, n in zip(ll, sample["n_tokens"])]
            return int(max(range(len(ll)), key=lambda i: (ll[i], -i)) == sample["gold"])
        key = "pred_norm" if field == "acc_norm" else "pred"
        if key in sample:
            return int(sample[key] == sample["gold"])
    return None


def print_icl_commands(foundry: dict[str, Any], icl_model: str | None, out_dir: str) -> None:
    work = foundry.get("work_dir")
    if not work:
        fail("the foundry JSON has no work_dir")
    model = icl_model or foundry.get("model", "MODEL_DIR")
    q = shlex.quote
    print("cargo build --release -p icl-cli")
    print(
        f"target/release/icl eval --model {q(model)} --suite {q(work + '/tasks.yaml')} --data-dir {q(work)} "
        f"--output {q(out_dir + '/results.json')} --log-samples {q(out_dir + '/samples.jsonl')}"
    )


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--foundry", required=True, type=Path, help="llm_foundry_eval.py output JSON")
    p.add_argument("--icl", type=Path, help="icl results.json")
    p.add_argument("--tolerance", type=float, default=0.0, help="largest accepted |acc difference|")
    p.add_argument("--icl-field", action="append", default=[], help="TYPE=FIELD: icl field compared for a task type")
    p.add_argument("--foundry-samples", type=Path, help="llm_foundry_eval.py --samples output")
    p.add_argument("--icl-samples", type=Path, help="icl --log-samples output")
    p.add_argument("--print-icl-commands", action="store_true", help="print the icl commands for the same rows")
    p.add_argument("--icl-model", help="model folder for --print-icl-commands (default: the one llm-foundry ran)")
    p.add_argument("--icl-out", default="target/foundry-check", help="output folder for --print-icl-commands")
    args = p.parse_args(argv)

    foundry = load_json(args.foundry)
    if args.print_icl_commands:
        print_icl_commands(foundry, args.icl_model, args.icl_out)
        if args.icl is None:
            return 0
    if args.icl is None:
        fail("--icl is required (or --print-icl-commands alone)")
    icl = load_json(args.icl)
    overrides = icl_fields(args.icl_field)

    header = f"{'task':<34} {'field':<12} {'n foundry':>9} {'n icl':>6} {'foundry':>8} {'icl':>8} {'diff':>8}  status"
    print(header)
    print("-" * len(header))
    bad = 0
    fields_used: dict[str, str] = {}

    def row(name: str, field: str, f: dict[str, Any], i: dict[str, Any] | None) -> None:
        nonlocal bad
        fa, fn = f.get("acc"), f.get("n")
        ia = None if i is None else i.get(field)
        inn = None if i is None else i.get("n")
        if ia is None:
            status, diff = "MISSING", None
        else:
            diff = ia - fa
            status = "ok"
            if inn is not None and fn is not None and inn != fn:
                status = "N DIFFERS"
            elif abs(diff) > args.tolerance:
                status = "DIFFERS"
        if status != "ok":
            bad += 1
        d = "-" if diff is None else f"{diff:+.4f}"
        print(f"{name:<34} {field:<12} {fn if fn is not None else '-':>9} {inn if inn is not None else '-':>6} {fmt(fa):>8} {fmt(ia):>8} {d:>8}  {status}")

    for name, f in foundry["tasks"].items():
        i = icl["tasks"].get(name)
        field = pick_field(f.get("icl_task_type", ""), i or {}, overrides)
        fields_used[name] = field
        row(name, field, f, i)
        for cat, fc in (f.get("categories") or {}).items():
            ic = None if i is None else (i.get("categories") or {}).get(cat)
            row(f"  {cat}", field, fc, ic)

    fg, ig = foundry.get("gauntlet"), icl.get("gauntlet")
    if fg and ig:
        print("\ngauntlet (llm-foundry's score: (acc - baseline) / (1 - baseline), averaged)")
        icats = ig.get("categories") or {}
        if isinstance(icats, list):  # [{name, score}, ...]
            icats = {c.get("name"): c for c in icats if isinstance(c, dict)}
        for cat, score in {**fg.get("categories", {}), **fg.get("averages", {})}.items():
            other = icats.get(cat)
            if isinstance(other, dict):
                other = other.get("score")
            if other is None and cat in fg.get("averages", {}):
                other = ig.get("average")
            d = "-" if other is None else f"{other - score:+.4f}"
            status = "MISSING" if other is None else "DIFFERS" if abs(other - score) > args.tolerance else "ok"
            bad += status != "ok"
            print(f"  {cat:<32} foundry {score:.4f}  icl {fmt(other)}  diff {d}  {status}")

    if args.foundry_samples and args.icl_samples:
        print("\nper-example outcomes")
        fs = load_samples(args.foundry_samples)
        isamples = {(s.get("task"), s.get("index")): s for s in load_samples(args.icl_samples)}
        by_task: dict[str, list[dict[str, Any]]] = {}
        for s in fs:
            by_task.setdefault(s["task"], []).append(s)
        for name, rows in by_task.items():
            differ, missing = [], 0
            # A category is its own icl task (`label/N-shot/CAT`) whose indices count that category's
            # rows in file order; llm-foundry's indices count the whole file.
            position: dict[tuple[str, int], int] = {}
            for cat in {s["category"] for s in rows if s.get("category") is not None}:
                ordered = sorted(s["index"] for s in rows if s.get("category") == cat)
                position.update({(cat, index): i for i, index in enumerate(ordered)})
            for s in rows:
                cat = s.get("category")
                if cat is None:
                    other = isamples.get((name, s["index"]))
                else:
                    other = isamples.get((f"{name}/{cat}", position[(cat, s["index"])]))
                oc = None if other is None else icl_correct(other, fields_used.get(name, "acc"))
                if oc is None:
                    missing += 1
                elif oc != s["correct"]:
                    differ.append(s["index"])
            note = f", {missing} without an icl outcome" if missing else ""
            shown = ", ".join(map(str, differ[:10])) + (" ..." if len(differ) > 10 else "")
            print(f"  {name:<32} {len(differ)} of {len(rows)} rows differ{note}{': ' + shown if differ else ''}")

    print(f"\n{bad} mismatch(es) beyond tolerance {args.tolerance}" if bad else f"\nall within tolerance {args.tolerance}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
