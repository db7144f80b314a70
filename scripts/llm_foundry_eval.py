#!/usr/bin/env python3
"""Run llm-foundry's own ICL evaluator on capped copies of its task files, for comparison with `icl`.

Runs in the venv of `scripts/setup_llm_foundry.sh` (llm-foundry 0.22.0, Composer 0.32.1,
transformers 4.51.3). It calls `llmfoundry.command_utils.evaluate` — the function behind llm-foundry's
`scripts/eval/eval.py` — with an `hf_causal_lm` model, so prompts, tokenization, batching, metrics and
the gauntlet are llm-foundry's own code; this script only prepares inputs and collects results.

    $ICL_FOUNDRY_VENV/bin/python scripts/llm_foundry_eval.py \
        --model ~/.cache/icl/models/smollm2-135m-instruct-hf \
        --tasks /work/shared/data/llm-foundry/eval/yamls/tasks_v0.3.yaml \
        --data-dir /work/shared/data/llm-foundry \
        --labels piqa,hellaswag,winograd,lambada_openai,jeopardy,gsm8k,svamp --num-fewshot 0 \
        --rows 100 --rows-for gsm8k=20,svamp=30 --rows-for jeopardy=20 \
        --gauntlet /work/shared/data/llm-foundry/eval/yamls/eval_gauntlet_v0.3.yaml \
        --work ~/.cache/icl/foundry/work --out ~/.cache/icl/foundry/results.json

Capping (llm-foundry has no `--limit`): each selected task's JSONL is copied to
`WORK/<dataset_uri>` with its first N rows (`--rows`, `--rows-for LABEL=N`); for a `has_categories`
task, the first N rows of each category (file order kept), so every category is represented.
`WORK/tasks.yaml` is the selected tasks with the chosen shot counts and llm-foundry's own keys, its
`dataset_uri`s unchanged (relative), so `icl eval --suite WORK/tasks.yaml --data-dir WORK` reads the
same rows (see `scripts/compare_llm_foundry.py --print-icl-commands`). With `--gauntlet`, the
gauntlet is cut to the benchmarks that were run (their `num_fewshot` set to the shot count run, the
first if several) and written to `WORK/gauntlet.yaml`.

Sequence length: llm-foundry pads every input to the task's `max_seq_len` and trims prompts from the
left beyond it. Padding does not change the results, trimming does; so each task gets the smallest
`max_seq_len` (a multiple of 64, at most `--max-seq-len`) that trims no capped row, which keeps CPU
time low. The output records it, and `trimmed_rows` > 0 says llm-foundry cut some prompts.

Transformers 4.51 reads model folders written by transformers 5 wrongly or not at all
(`rope_parameters` is ignored, so RoPE would fall back to theta 10000; tokenizer class
`TokenizersBackend` is unknown): the script makes a view of the folder in `WORK/model` (weights and
`tokenizer.json` symlinked) with `rope_theta`/`rope_scaling` and `PreTrainedTokenizerFast` written the
4.51 way, and lists each edit in the output under `model_view_edits`.

Output JSON (`--out`):
    {"llm_foundry": "0.22.0", "composer", "transformers", "torch", "model", "seconds",
     "tasks": {"piqa/0-shot": {"label", "num_fewshot", "icl_task_type", "metric", "acc", "n",
               "max_seq_len", "trimmed_rows", "max_new_tokens"?, "seconds",
               "categories"?: {CAT: {"acc", "n"}}, "acc_pooled"?}},
     "gauntlet"?: {"categories": {...}, "averages": {...}}, "work_dir", "model_view_edits"}
For a `has_categories` task `acc` is llm-foundry's figure, the unweighted mean of the category
accuracies (its results table's "Average" row and what its gauntlet uses); `acc_pooled` is correct /
n over all rows. `--samples FILE` also writes one JSON line per example: `task`, `category`, `index`
(0-based row of the capped file), `correct`, and `pred`/`gold` (choice tasks) or `output` (generation:
the cleaned answer llm-foundry compared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

SEQ_LEN_STEP = 64


class PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full: no YAML anchors or aliases for other readers (icl) to resolve."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (weights + tokenizer)")
    p.add_argument("--tasks", required=True, type=Path, help="llm-foundry tasks YAML (icl_tasks: [...])")
    p.add_argument("--data-dir", type=Path, default=Path.cwd(), help="folder that relative dataset_uris resolve against (llm-foundry: the working directory)")
    p.add_argument("--labels", help="comma-separated task labels to run (default: all in the YAML)")
    p.add_argument("--num-fewshot", help="comma-separated shot counts replacing each task's num_fewshot")
    p.add_argument("--rows", type=int, default=100, help="rows kept per task (per category for has_categories tasks)")
    p.add_argument("--rows-for", action="append", default=[], help="LABEL=N[,LABEL=N...]: per-task row caps")
    p.add_argument("--gauntlet", type=Path, help="llm-foundry eval_gauntlet YAML to score the run with")
    p.add_argument("--work", required=True, type=Path, help="folder for the capped data, YAMLs and model view")
    p.add_argument("--out", required=True, type=Path, help="result JSON")
    p.add_argument("--samples", type=Path, help="per-example JSONL")
    p.add_argument("--batch-size", type=int, default=8, help="device_eval_batch_size")
    p.add_argument("--max-seq-len", type=int, default=2048, help="upper bound of the per-task max_seq_len")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=17, help="llm-foundry's eval seed (its default)")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"llm_foundry_eval: {msg}", file=sys.stderr)
    sys.exit(2)


def row_caps(args: argparse.Namespace) -> dict[str, int]:
    caps: dict[str, int] = {}
    for spec in args.rows_for:
        for item in spec.split(","):
            label, sep, n = item.partition("=")
            if not sep or not n.strip().isdigit() or int(n) < 1:
                fail(f"--rows-for {item!r}: expected LABEL=N with N >= 1")
            caps[label.strip()] = int(n)
    return caps


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{line_no}: not JSON: {e}")
            if not isinstance(row, dict):
                fail(f"{path}:{line_no}: expected a JSON object")
            rows.append(row)
    return rows


def cap_rows(rows: list[dict[str, Any]], n: int, has_categories: bool, path: Path) -> list[dict[str, Any]]:
    if not has_categories:
        return rows[:n]
    kept: list[dict[str, Any]] = []
    per_category: dict[str, int] = {}
    for line_no, row in enumerate(rows, 1):
        if "category" not in row:
            fail(f"{path}:{line_no}: has_categories task row has no 'category' key")
        cat = row["category"]
        if per_category.get(cat, 0) < n:
            per_category[cat] = per_category.get(cat, 0) + 1
            kept.append(row)
    return kept


def select_tasks(args: argparse.Namespace) -> list[dict[str, Any]]:
    with open(args.tasks, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("icl_tasks"), list):
        fail(f"{args.tasks}: expected a mapping with an 'icl_tasks' list")
    tasks = cfg["icl_tasks"]
    for i, t in enumerate(tasks):
        for key in ("label", "dataset_uri", "icl_task_type", "num_fewshot"):
            if not isinstance(t, dict) or key not in t:
                fail(f"{args.tasks}: icl_tasks[{i}] has no '{key}' key")
    by_label = {t["label"]: t for t in tasks}
    if args.labels:
        wanted = [s.strip() for s in args.labels.split(",") if s.strip()]
        missing = [w for w in wanted if w not in by_label]
        if missing:
            fail(f"{args.tasks}: no task labelled {', '.join(missing)} (labels: {', '.join(by_label)})")
        tasks = [by_label[w] for w in wanted]
    if args.num_fewshot:
        shots = [int(s) for s in args.num_fewshot.split(",")]
        tasks = [{**t, "num_fewshot": list(shots)} for t in tasks]
    return [dict(t) for t in tasks]


def write_capped_data(args: argparse.Namespace, tasks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    caps = row_caps(args)
    unknown = set(caps) - {t["label"] for t in tasks}
    if unknown:
        fail(f"--rows-for names tasks that are not run: {', '.join(sorted(unknown))}")
    capped: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        uri = t["dataset_uri"]
        if "://" in uri:
            fail(f"{args.tasks}: task {t['label']}: only local dataset_uris can be capped, got {uri}")
        src = Path(uri) if Path(uri).is_absolute() else args.data_dir / uri
        if not src.is_file():
            fail(f"{args.tasks}: task {t['label']}: dataset_uri {uri} not found as {src}")
        rows = cap_rows(read_jsonl(src), caps.get(t["label"], args.rows), bool(t.get("has_categories")), src)
        rel = Path(uri).name if Path(uri).is_absolute() else uri
        dst = args.work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        t["dataset_uri"] = str(rel)
        capped[t["label"]] = rows
    return capped


def model_view(model: Path, work: Path) -> tuple[Path, list[str]]:
    """A folder transformers 4.51 reads as transformers 5 meant the original (see the module doc)."""
    view = work / "model"
    view.mkdir(parents=True, exist_ok=True)
    edits: list[str] = []
    for entry in model.iterdir():
        target = view / entry.name
        if entry.name in ("config.json", "tokenizer_config.json"):
            continue
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(entry.resolve())
    config = json.loads((model / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if rope is not None and "rope_theta" not in config:
        config["rope_theta"] = rope.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", "default")
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config["rope_scaling"] = None if rope_type == "default" else scaling
        edits.append(f"config.json: rope_parameters {json.dumps(rope)} -> rope_theta {config['rope_theta']}, rope_scaling {config['rope_scaling']}")
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config.pop("dtype")
        edits.append(f"config.json: dtype -> torch_dtype {config['torch_dtype']}")
    (view / "config.json").write_text(json.dumps(config, indent=2))
    tok_path = model / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") in ("TokenizersBackend", None):
            edits.append(f"tokenizer_config.json: tokenizer_class {tok.get('tokenizer_class')} -> PreTrainedTokenizerFast")
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("backend", "is_local", "local_files_only"):
            tok.pop(key, None)
        (view / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return view, edits


def strip_row(row: dict[str, Any]) -> dict[str, Any]:
    """llm-foundry's `strip_data`: string fields stripped, lists (choices, options, aliases) untouched."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}


def row_lengths(task: dict[str, Any], row: dict[str, Any], tokenizer: Any) -> list[int]:
    """Tokens of each zero-shot sequence of a row, built and tokenized piecewise as llm-foundry does."""
    enc = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    prefix_space = len(tokenizer(" a", add_special_tokens=False)["input_ids"]) == 1
    spaced = lambda s: f" {s}" if prefix_space and not s.startswith(" ") else s  # noqa: E731
    preamble = tokenizer(task.get("prompt_string", ""))["input_ids"]
    if len(preamble) > 1 and preamble[-1] == tokenizer.eos_token_id:
        preamble = preamble[:-1]
    kind = task["icl_task_type"]
    cd = task.get("continuation_delimiter", " ")
    pre = task.get("prelimiter", task.get("question_prelimiter", ""))
    r = strip_row(row)
    if kind == "multiple_choice":
        ctx = enc(f"{pre}{r['query']}{cd}".rstrip())
        return [len(preamble) + ctx + enc(spaced(c)) for c in r["choices"]]
    if kind == "schema":
        cont = enc(spaced(r["continuation"]))
        return [len(preamble) + enc(f"{pre}{c}") + cont for c in r["context_options"]]
    ctx = len(preamble) + enc(f"{pre}{r['context']}{cd}".rstrip())
    if kind == "language_modeling":
        return [ctx + enc(spaced(r["continuation"]))]
    return [ctx]


def max_answer_length(task: dict[str, Any], rows: list[dict[str, Any]], tokenizer: Any) -> int:
    """llm-foundry's `_get_max_answer_length` (its max_new_tokens): unstripped rows, special tokens on."""
    cot = task.get("cot_delimiter", "")
    has_cot = any("chain_of_thought" in r for r in rows)
    longest = 0
    for r in rows:
        for ans in {r["answer"], *r.get("aliases", [])}:
            text = f"{r.get('chain_of_thought', '')}{cot}{ans}" if has_cot else ans
            longest = max(longest, len(tokenizer(text)["input_ids"]))
    return longest + (10 if cot else 0)


def prompt_budget(task: dict[str, Any], rows: list[dict[str, Any]], tokenizer: Any, max_seq_len: int) -> int:
    """llm-foundry's padding_size: the tokens a sequence may have before it trims the prompt."""
    if task["icl_task_type"] == "generation_task_with_answers":
        return max_seq_len - max_answer_length(task, rows, tokenizer)
    return max_seq_len


def seq_len_for(task: dict[str, Any], rows: list[dict[str, Any]], tokenizer: Any, cap: int) -> int:
    """The smallest multiple of SEQ_LEN_STEP (at most cap) under which no zero-shot row is trimmed."""
    if max(task["num_fewshot"]) > 0:
        return cap  # shots are drawn by llm-foundry; their length is not known here
    need = max(max(row_lengths(task, r, tokenizer)) for r in rows)
    if task["icl_task_type"] == "generation_task_with_answers":
        need += max_answer_length(task, rows, tokenizer)
    return min(cap, SEQ_LEN_STEP * math.ceil(need / SEQ_LEN_STEP))


def trimmed_rows(task: dict[str, Any], rows: list[dict[str, Any]], tokenizer: Any, max_seq_len: int) -> int:
    """Zero-shot rows with a sequence longer than llm-foundry's budget (it trims their prompt); -1 with shots."""
    if max(task["num_fewshot"]) > 0:
        return -1
    budget = prompt_budget(task, rows, tokenizer, max_seq_len)
    return sum(1 for r in rows if max(row_lengths(task, r, tokenizer)) > budget)


def gauntlet_subset(path: Path, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("eval_gauntlet"), dict):
        fail(f"{path}: expected a mapping with an 'eval_gauntlet' mapping")
    g = dict(cfg["eval_gauntlet"])
    shots = {t["label"]: t["num_fewshot"][0] for t in tasks}
    categories = []
    for i, cat in enumerate(g.get("categories", [])):
        if "name" not in cat or "benchmarks" not in cat:
            fail(f"{path}: eval_gauntlet.categories[{i}] needs 'name' and 'benchmarks'")
        kept = [{**b, "num_fewshot": shots[b["name"]]} for b in cat["benchmarks"] if b.get("name") in shots]
        if kept:
            categories.append({"name": cat["name"], "benchmarks": kept})
    if not categories:
        fail(f"{path}: none of the run tasks is a gauntlet benchmark")
    g["categories"] = categories
    names = {c["name"] for c in categories}
    if "averages" in g:
        g["averages"] = {k: [c for c in v if c in names] for k, v in g["averages"].items()}
        g["averages"] = {k: v for k, v in g["averages"].items() if v}
    return g


RECORDS: dict[str, list[dict[str, Any]]] = {}
TIMINGS: dict[str, float] = {}
MAX_NEW_TOKENS: dict[str, int] = {}


def sample_recorder_callback() -> Any:
    """A Composer callback, registered with llm-foundry as `icl_sample_recorder`: keeps each example's
    outcome from llm-foundry's own metric_result_dict and each evaluator's wall time (it changes nothing)."""
    from composer.core import Callback

    class SampleRecorder(Callback):
        def eval_start(self, state: Any, logger: Any) -> None:
            self.started = time.time()

        def eval_end(self, state: Any, logger: Any) -> None:
            TIMINGS[state.dataloader_label] = time.time() - self.started

        def eval_batch_end(self, state: Any, logger: Any) -> None:
            out = state.metric_outputs or {}
            batch = state.batch if isinstance(state.batch, dict) else {}
            limit = (batch.get("generation_kwargs") or {}).get("max_new_tokens")
            if batch.get("mode") == "generate" and limit is not None:
                MAX_NEW_TOKENS[state.dataloader_label] = int(limit)
            rows = RECORDS.setdefault(state.dataloader_label, [])
            for j, correct in enumerate(out.get("result", [])):
                rec: dict[str, Any] = {"correct": int(correct)}
                if "selected_choice_idx" in out:
                    rec["pred"] = int(out["selected_choice_idx"][j])
                    rec["gold"] = int(out["correct_choice_idx"][j])
                if "cleaned_output" in out:
                    rec["output"] = out["cleaned_output"][j]
                rows.append(rec)

    return SampleRecorder


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    args.data_dir = args.data_dir.resolve()
    args.model = args.model.resolve()
    if not (args.model / "config.json").is_file():
        fail(f"{args.model}: no config.json (expected a Hugging Face model folder)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(args.work / "hf-datasets-cache")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work.mkdir(parents=True, exist_ok=True)

    tasks = select_tasks(args)
    capped = write_capped_data(args, tasks)
    with open(args.work / "tasks.yaml", "w", encoding="utf-8") as f:
        yaml.dump({"icl_tasks": tasks}, f, Dumper=PlainDumper, sort_keys=False, allow_unicode=True)
    gauntlet = gauntlet_subset(args.gauntlet, tasks) if args.gauntlet else None
    if gauntlet is not None:
        with open(args.work / "gauntlet.yaml", "w", encoding="utf-8") as f:
            yaml.dump({"eval_gauntlet": gauntlet}, f, Dumper=PlainDumper, sort_keys=False)
    view, edits = model_view(args.model, args.work)

    import composer
    import llmfoundry
    import torch
    import transformers
    from llmfoundry import registry
    from llmfoundry.command_utils import evaluate
    from omegaconf import OmegaConf as om

    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(view))
    foundry_tasks = []
    for t in tasks:
        ft = dict(t)
        ft["max_seq_len"] = seq_len_for(t, capped[t["label"]], tokenizer, args.max_seq_len)
        foundry_tasks.append(ft)

    cfg = {
        "run_name": "icl-llm-foundry-check",
        "seed": args.seed,
        "max_seq_len": args.max_seq_len,
        "device_eval_batch_size": args.batch_size,
        "precision": "fp32",
        "python_log_level": "info",
        "models": [
            {
                "model_name": args.model.name,
                "model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": str(view), "pretrained": True, "init_device": "cpu"},
                "tokenizer": {"name": str(view), "kwargs": {"model_max_length": args.max_seq_len}},
            }
        ],
        "icl_tasks": foundry_tasks,
        "callbacks": {"icl_sample_recorder": {}},
    }
    if gauntlet is not None:
        cfg["eval_gauntlet"] = gauntlet

    registry.callbacks.register("icl_sample_recorder", func=sample_recorder_callback())

    # llm-foundry copies each dataset to <cwd>/<label>-<shots>.jsonl and resolves relative uris there.
    os.chdir(args.work)
    started = time.time()
    trainers, _ = evaluate(om.create(cfg))
    seconds = time.time() - started
    trainer = trainers[0]

    results: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    for t, ft in zip(tasks, foundry_tasks):
        for shots in t["num_fewshot"]:
            name = f"{t['label']}/{shots}-shot"
            entry: dict[str, Any] = {
                "label": t["label"],
                "num_fewshot": shots,
                "icl_task_type": t["icl_task_type"],
                "max_seq_len": ft["max_seq_len"],
            }
            metrics = {k: v for k, v in trainer.state.eval_metrics.items() if k == name or k.startswith(name + "/")}
            if not metrics:
                fail(f"llm-foundry reported no metrics for {name}")
            cats: dict[str, Any] = {}
            correct = total = 0.0
            for key, ms in sorted(metrics.items()):
                metric_name, metric = next(iter(ms.items()))
                acc, n = float(metric.compute()), int(metric.total)
                correct += float(metric.correct)
                total += n
                entry["metric"] = metric_name
                recs = RECORDS.get(key, [])
                if key == name:
                    entry.update(acc=acc, n=n)
                    for i, rec in enumerate(recs):
                        samples.append({"task": name, "index": i, **rec})
                else:
                    cat = key[len(name) + 1 :]
                    cats[cat] = {"acc": acc, "n": n}
                    rows = [i for i, r in enumerate(capped[t["label"]]) if r["category"] == cat]
                    for i, rec in zip(rows, recs):
                        samples.append({"task": name, "category": cat, "index": i, **rec})
            if cats:
                entry["acc"] = sum(c["acc"] for c in cats.values()) / len(cats)
                entry["n"] = int(total)
                entry["acc_pooled"] = correct / total
                entry["categories"] = cats
            entry["seconds"] = round(sum(v for k, v in TIMINGS.items() if k == name or k.startswith(name + "/")), 1)
            entry["trimmed_rows"] = trimmed_rows(t, capped[t["label"]], tokenizer, ft["max_seq_len"])
            if t["icl_task_type"] == "generation_task_with_answers":
                # llm-foundry's own value; the recomputation sized max_seq_len, so they must agree.
                used = {v for k, v in MAX_NEW_TOKENS.items() if k == name or k.startswith(name + "/")}
                mine = max_answer_length(t, capped[t["label"]], tokenizer)
                if used != {mine}:
                    print(f"llm_foundry_eval: {name}: llm-foundry used max_new_tokens {sorted(used)}, recomputed {mine}", file=sys.stderr)
                entry["max_new_tokens"] = max(used) if used else mine
            results[name] = entry

    out: dict[str, Any] = {
        "llm_foundry": llmfoundry.__version__,
        "composer": composer.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": str(args.model),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 1),
        "work_dir": str(args.work),
        "model_view_edits": edits,
        "tasks": results,
    }
    gauntlet_cb = next((c for c in trainer.state.callbacks if type(c).__name__ == "EvalGauntlet"), None)
    if gauntlet_cb is not None:
        scores = gauntlet_cb.eval_after_all(trainer.state, None)
        prefix = "icl/metrics/eval_gauntlet/"
        flat = {k[len(prefix) :]: float(v) for k, v in scores.items()}
        out["gauntlet"] = {
            "categories": {k: v for k, v in flat.items() if k in {c["name"] for c in gauntlet["categories"]}},
            "averages": {k: v for k, v in flat.items() if k in gauntlet.get("averages", {})},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.samples:
        with open(args.samples, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
    print(json.dumps({k: {"acc": v["acc"], "n": v["n"]} for k, v in results.items()}, indent=1))
    print(f"llm_foundry_eval: {args.out} ({seconds:.0f} s)")
    return 0



if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
