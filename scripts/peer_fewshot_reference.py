#!/usr/bin/env python3
"""The peers' own few-shot choice, for `crates/icl-data/tests/peer_fewshot.rs`.

Usage: python peer_fewshot_reference.py --llm-foundry WHEEL_OR_DIR --workdir DIR < cases.json > out.json

Runs, on the cases of the input JSON (seeds are decimal strings, any size):
- "llm_foundry": [{"n", "k", "seed"}]: llm-foundry 0.22.0's own `get_fewshot_sample_idxs`, its source
  read from the release (`llmfoundry/eval/datasets/utils.py` in the wheel or an unpacked tree; only
  that function is compiled, so torch and transformers are not imported), called as
  `InContextLearningDataset` does: one `random.Random(fewshot_random_seed)`, the examples in order,
  no call when k == 0, the shots in the iteration order of the returned set.
  Out: {"shots": [[row, ...] per example], "choice_calls": n}.
- "lm_eval_sampler": [{"pool": [content id per row], "eval": [content id or null per doc], "k",
  "seed"}]: lm-eval's `ContextSampler` (the installed lm_eval) on docs `{"c": id}` (rows with the same
  id are equal docs), `set_rnd(seed)`, then `sample(n=k, eval_doc=...)` per doc in order.
  Out: {"shots": [...]} or {"error": "ValueError" or "AssertionError"}, plus "self_drawn" (docs whose n + 1 draw held an
  equal doc) and "resampled" (second draws).
- "lm_eval_task": [{"n", "k", "seed", "world_size", "split": "test" | "train" | "none" |
  "validation", "train_n"}]: a whole lm-eval `ConfigurableTask` on JSONL files written to workdir
  (test docs "q{i}", training docs "t{i}"): "test" sets fewshot_split = test_split = test, "train"
  fewshot_split = train with test_split = test, "none" only test_split = test, "validation" only
  validation_split = test (no test_split, no fewshot_split). `set_fewshot_seed(seed)` and
  `build_all_requests(rank, world_size)` for every rank; the shots are parsed back from the contexts.
  Out: {"ranks": [[[doc_id, [row, ...]], ...] per rank]} or {"error": "ValueError"}.
"""
import __future__
import argparse
import ast
import json
import logging
import os
import random
import sys
import zipfile
from pathlib import Path

UTILS = "llmfoundry/eval/datasets/utils.py"


def llm_foundry_function(path):
    """llm-foundry's `get_fewshot_sample_idxs`, compiled from the release's own source."""
    path = Path(path)
    if path.is_dir():
        src = (path / UTILS).read_text()
    else:
        with zipfile.ZipFile(path) as z:
            src = z.read(UTILS).decode()
    tree = ast.parse(src)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_fewshot_sample_idxs")
    code = compile(ast.Module(body=[fn], type_ignores=[]), f"{path}!{UTILS}", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    namespace = {"random": random}
    exec(code, namespace)
    return namespace["get_fewshot_sample_idxs"]


class CountingRandom(random.Random):
    """random.Random with the same stream (random/getrandbits untouched), counting calls."""

    def __init__(self, seed):
        super().__init__(seed)
        self.choices_made = 0
        self.samples = []

    def choice(self, seq):
        self.choices_made += 1
        return super().choice(seq)

    def sample(self, population, k, **kw):
        out = super().sample(population, k, **kw)
        self.samples.append(out)
        return out


def run_llm_foundry(fn, case):
    n, k = case["n"], case["k"]
    rng = CountingRandom(int(case["seed"]))
    # As InContextLearningDataset._prepare_dataset / _generate_few_shot_prompt (llm-foundry 0.22.0):
    shots = [list(fn(n, k, i, rng)) if k > 0 else [] for i in range(n)]
    return {"shots": shots, "choice_calls": rng.choices_made}


def run_lm_eval_sampler(case):
    from lm_eval.api.samplers import ContextSampler

    pool = [{"c": c} for c in case["pool"]]
    row_of = {id(d): i for i, d in enumerate(pool)}
    sampler = ContextSampler(pool, rnd=None)
    seed = int(case["seed"])
    sampler.set_rnd(seed)  # as Task.set_fewshot_seed does
    rng = CountingRandom(seed)
    sampler.rnd = rng  # the same stream as set_rnd's Random(seed), with the draws recorded
    shots, self_drawn, resampled = [], 0, 0
    try:
        for e in case["eval"]:
            doc = None if e is None else {"c": e}
            before = len(rng.samples)
            got = sampler.sample(n=case["k"], eval_doc=doc)
            draws = rng.samples[before:]
            if doc is not None and draws and any(x == doc for x in draws[0]):
                self_drawn += 1
            resampled += max(0, len(draws) - 1)
            shots.append([row_of[id(x)] for x in got])
    except (ValueError, AssertionError) as e:
        return {"error": type(e).__name__, "self_drawn": self_drawn, "resampled": resampled}
    return {"shots": shots, "self_drawn": self_drawn, "resampled": resampled}


def write_jsonl(path, prefix, answer, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"q": f"{prefix}{i}", "a": f"{answer}{i}"}) + "\n")


def run_lm_eval_task(case, workdir, serial):
    from lm_eval.api.task import ConfigurableTask

    d = Path(workdir) / f"task{serial}"
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "test.jsonl", "q", "a", case["n"])
    files = {"test": str(d / "test.jsonl")}
    split = case["split"]
    cfg = dict(task=f"peer_fewshot_{serial}", dataset_path="json", output_type="generate_until",
               doc_to_text="{{q}}", doc_to_target="{{a}}", num_fewshot=case["k"], fewshot_delimiter="|",
               target_delimiter="=", generation_kwargs={"until": ["\n"]}, metadata={"version": 1})
    if split == "test":
        cfg.update(test_split="test", fewshot_split="test")
    elif split == "train":
        write_jsonl(d / "train.jsonl", "t", "b", case["train_n"])
        files["train"] = str(d / "train.jsonl")
        cfg.update(test_split="test", fewshot_split="train")
    elif split == "none":
        cfg.update(test_split="test")
    elif split == "validation":
        files = {"validation": files["test"]}
        cfg.update(validation_split="validation")
    else:
        raise SystemExit(f"unknown split {split}")
    cfg["dataset_kwargs"] = {"data_files": files}
    ranks = []
    try:
        for rank in range(case["world_size"]):
            task = ConfigurableTask(config=cfg)
            task.set_fewshot_seed(int(case["seed"]))
            task.build_all_requests(rank=rank, world_size=case["world_size"])
            docs = []
            for inst in task.instances:
                parts = inst.args[0].split("|")
                docs.append([inst.doc_id, [int(p.split("=")[0][1:]) for p in parts[:-1]]])
            ranks.append(docs)
    except ValueError as e:
        return {"error": type(e).__name__}
    return {"ranks": ranks}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm-foundry", required=True, help="llm-foundry wheel or unpacked tree")
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(a.workdir) / "hf-datasets"))
    logging.disable(logging.WARNING)
    cases = json.load(sys.stdin)
    fn = llm_foundry_function(a.llm_foundry)
    out = {
        "llm_foundry": [run_llm_foundry(fn, c) for c in cases.get("llm_foundry", [])],
        "lm_eval_sampler": [run_lm_eval_sampler(c) for c in cases.get("lm_eval_sampler", [])],
        "lm_eval_task": [run_lm_eval_task(c, a.workdir, i) for i, c in enumerate(cases.get("lm_eval_task", []))],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
