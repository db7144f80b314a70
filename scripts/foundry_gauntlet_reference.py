#!/usr/bin/env python3
"""llm-foundry 0.22.0's own gauntlet, exact-match and prompt code, for `crates/icl-cli/tests/foundry_gauntlet.rs`.

Usage: python foundry_gauntlet_reference.py --llm-foundry WHEEL_OR_DIR --workdir DIR < cases.json > out.json

The release's own source files are imported (composer, torchmetrics and the registry, which these code
paths do not use, are replaced by small stand-ins; torch, transformers and datasets are the venv's):
- "gauntlet": [{"config": eval_gauntlet mapping, "metrics": {"label/N-shot[/category]": acc},
  "sizes": {same keys: rows}}]: `EvalGauntlet(logger_keys, benchmark_sizes=sizes, **config)` then
  `eval_after_all` on a state whose evaluators hold those accuracies (logger keys
  `metrics/<evaluator label>/<Accuracy metric>`, as `build_icl_evaluators` makes them).
  Out: {"scores": {name: value}} (keys without the `icl/metrics/eval_gauntlet/` prefix) or {"error": message}.
- "exact_match": [{"output", "labels", "cot_delimiter", "do_normalization", "stopping_criteria"}]:
  `InContextLearningGenerationExactMatchAccuracy.update` on one output. Out: 0 or 1 each.
- "prompts": [{"suite", "data_dir", "label", "num_fewshot", "category" (has_categories tasks),
  "tokenizer", "shots": [[row, ...] per example], "rows": N}]: the task entry of the tasks YAML made
  into dataset arguments as `build_icl_evaluators` does, run in `data_dir` (dataset_uri is relative to
  it), the category's partition from `partition_dataset_by_category`; the `InContextLearning*Dataset`
  of its type, with `get_fewshot_sample_idxs` answering each example's `shots` (icl's draw; the
  sampler itself is checked in peer_fewshot.rs) and `tokenize_example` recording its text instead of
  tokens. Out: {"size", "prompts": [{"prompt", "context" (a list; schema: one per option), "answer"
  (multiple choice: the choices)} for the first N examples], "max_new_tokens" and "aliases" (sorted,
  per example) for generation}.
"""
import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import types
import zipfile
from pathlib import Path


def release_dir(path, workdir):
    path = Path(path)
    if path.is_dir():
        return path
    out = Path(workdir) / "llm_foundry_release"
    if not out.exists():
        with zipfile.ZipFile(path) as z:
            z.extractall(out)
    return out


def stub(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def package(name, path):
    module = stub(name)
    module.__path__ = [str(path)]
    return module


def install_stand_ins(root):
    """composer, torchmetrics and the registry as far as the imported files need them at import time."""

    class Callback:
        pass

    class Metric:
        def __init__(self, dist_sync_on_step=False):
            pass

        def add_state(self, name, default, dist_reduce_fx=None):
            setattr(self, name, default)

    def get_file(uri, destination, overwrite=False):
        shutil.copyfile(uri, destination)

    dist = types.SimpleNamespace(
        get_local_rank=lambda: 0,
        barrier=lambda: None,
        all_gather_object=lambda obj: [obj],
        local_rank_zero_download_and_wait=lambda path: contextlib.nullcontext(),
    )
    stub("composer")
    stub("composer.core", Callback=Callback, State=object, DataSpec=lambda *a, **k: None)
    stub("composer.core.data_spec", _default_split_batch=None, _split_list=None)
    stub("composer.loggers", Logger=object)
    stub("composer.utils", MissingConditionalImportError=ImportError, dist=dist, get_file=get_file)
    stub("torchmetrics", Metric=Metric)
    package("llmfoundry", root / "llmfoundry")
    stub("llmfoundry.registry", icl_datasets=None)
    sys.modules["llmfoundry"].registry = sys.modules["llmfoundry.registry"]
    package("llmfoundry.utils", root / "llmfoundry/utils")
    stub("llmfoundry.utils.registry_utils", construct_from_registry=None)
    package("llmfoundry.eval", root / "llmfoundry/eval")
    package("llmfoundry.eval.datasets", root / "llmfoundry/eval/datasets")
    package("llmfoundry.eval.metrics", root / "llmfoundry/eval/metrics")
    package("llmfoundry.callbacks", root / "llmfoundry/callbacks")


class FakeMetric:
    def __init__(self, value):
        self.value = value

    def compute(self):
        return types.SimpleNamespace(item=lambda: self.value)


METRIC = "InContextLearningLMAccuracy"


def run_gauntlet(case):
    gauntlet = importlib.import_module("llmfoundry.callbacks.eval_gauntlet_callback")
    config = json.loads(json.dumps(case["config"]))  # EvalGauntlet writes into its categories
    logger_keys = [f"metrics/{label}/{METRIC}" for label in case["metrics"]]
    try:
        callback = gauntlet.EvalGauntlet(logger_keys=logger_keys, benchmark_sizes=case["sizes"], **config)
    except Exception as e:  # llm-foundry's refusals are plain Exceptions and ValueErrors
        return {"error": str(e)}
    state = types.SimpleNamespace(
        eval_metrics={label: {METRIC: FakeMetric(acc)} for label, acc in case["metrics"].items()}
    )
    scores = callback.eval_after_all(state, None)
    prefix = "icl/metrics/eval_gauntlet/"
    return {"scores": {k[len(prefix):]: v for k, v in scores.items()}}


def run_exact_match(case):
    nlp = importlib.import_module("llmfoundry.eval.metrics.nlp")
    metric = nlp.InContextLearningGenerationExactMatchAccuracy()
    batch = {
        "cot_delimiter": case["cot_delimiter"],
        "do_normalization": case["do_normalization"],
        "stopping_criteria": case["stopping_criteria"],
    }
    result = metric.update(batch, [case["output"]], [case["labels"]])
    return result["result"][0]


DATASETS = {
    "language_modeling": "InContextLearningLMTaskDataset",
    "multiple_choice": "InContextLearningMultipleChoiceTaskDataset",
    "schema": "InContextLearningSchemaTaskDataset",
    "generation_task_with_answers": "InContextLearningGenerationTaskWithAnswersDataset",
}


def dataset_kwargs(entry, num_fewshot):
    """A task entry's dataset constructor arguments, as `build_icl_evaluators` makes them."""
    kwargs = dict(entry)
    for key in ("label", "metric_names", "icl_task_type", "batch_size", "has_categories", "dataset_uri"):
        kwargs.pop(key, None)
    if "question_prelimiter" in kwargs:
        kwargs["prelimiter"] = kwargs.pop("question_prelimiter")
    kwargs["num_fewshot"] = num_fewshot
    return kwargs


def run_prompts(case, workdir, tokenizers):
    import yaml
    from transformers import AutoTokenizer

    icl = importlib.import_module("llmfoundry.eval.datasets.in_context_learning_evaluation")
    shots = case["shots"]
    icl.get_fewshot_sample_idxs = lambda size, k, idx, rng: list(shots[idx]) if idx < len(shots) else []
    with open(case["suite"]) as f:
        entry = next(t for t in yaml.safe_load(f)["icl_tasks"] if t["label"] == case["label"])
    kind = entry["icl_task_type"]
    cls = getattr(icl, DATASETS[kind])

    def record(self, prompt_and_fewshot, ctxt, example):
        if kind == "multiple_choice":
            answer = example["choices"]
        elif kind == "schema":
            # InContextLearningSchemaTaskDataset.tokenize_example's continuation text.
            continuation = example["continuation"]
            if self.prefix_space and not continuation.startswith(" "):
                continuation = f" {continuation}"
            answer = [continuation]
        else:
            answer = [self.get_answer_from_example(example)]
        return {"prompt": prompt_and_fewshot, "context": ctxt if isinstance(ctxt, list) else [ctxt], "answer": answer}

    cls.tokenize_example = record
    name = case["tokenizer"]
    if name not in tokenizers:
        tokenizers[name] = AutoTokenizer.from_pretrained(name)
    tokenizer = tokenizers[name]
    # llm-foundry reads dataset_uri relative to the folder it runs in.
    os.chdir(case["data_dir"])
    n = len(os.listdir(workdir))
    destination = os.path.join(workdir, f"{case['label']}-{n}.jsonl")
    uri = entry["dataset_uri"]
    if entry.get("has_categories"):
        uri = icl.partition_dataset_by_category(uri, destination, {}, {})[case["category"]]
        destination = uri + "_tmp"
    dataset = cls(
        dataset_uri=uri,
        tokenizer=tokenizer,
        max_seq_len=2048,
        pad_tok_id=tokenizer.eos_token_id,
        destination_path=destination,
        **dataset_kwargs(entry, case["num_fewshot"]),
    )
    rows = min(case["rows"], len(dataset))
    out = {"prompts": [], "size": len(dataset)}
    for i in range(rows):
        p = dataset[i]
        out["prompts"].append({"prompt": p["prompt"], "context": p["context"], "answer": p["answer"]})
    if kind == "generation_task_with_answers":
        out["max_new_tokens"] = dataset.base_batch["generation_kwargs"]["max_new_tokens"]
        out["aliases"] = [sorted(dataset.dataset[i]["aliases"]) for i in range(rows)]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llm-foundry", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(args.workdir, "hf_datasets"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    root = release_dir(args.llm_foundry, args.workdir)
    install_stand_ins(root)
    cases = json.load(sys.stdin)
    tokenizers = {}
    out = {
        "gauntlet": [run_gauntlet(c) for c in cases.get("gauntlet", [])],
        "exact_match": [run_exact_match(c) for c in cases.get("exact_match", [])],
        "prompts": [run_prompts(c, args.workdir, tokenizers) for c in cases.get("prompts", [])],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
