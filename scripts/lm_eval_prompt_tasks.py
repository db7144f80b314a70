#!/usr/bin/env python3
"""Write lm-eval task YAMLs that score the exact prompts dumped by `icl eval --write-prompts`.

Usage:
    ~/.cache/icl/venv/bin/python scripts/lm_eval_prompt_tasks.py --prompts PROMPTS.jsonl --out DIR
then: lm_eval ... --include_path DIR --tasks <the names printed, one per line>

Each language-modelling or multiple-choice task of the file becomes a zero-shot lm-eval task
`iclp_<name>` (non-alphanumerics of the name -> `_`) whose docs are the dumped lines: the context is
`context` verbatim, the continuation(s) `targets` verbatim (target_delimiter ""), gold `gold`. Few-shot
prompts built by icl are thereby scored by lm-eval as they are. Schema tasks are skipped (lm-eval
scores one context per document).
"""
import argparse
import json
import re
from pathlib import Path

UTILS = '''def context(doc):
    return doc["context"]


def lm_target(doc):
    return doc["targets"][0]


def choices(doc):
    return list(doc["targets"])


def gold(doc):
    return int(doc["gold"])
'''

LM = """output_type: loglikelihood
doc_to_text: !function utils.context
doc_to_target: !function utils.lm_target
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""
MC = """output_type: multiple_choice
doc_to_text: !function utils.context
doc_to_choice: !function utils.choices
doc_to_target: !function utils.gold
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "utils.py").write_text(UTILS)
    tasks = {}
    with a.prompts.open() as f:
        for line in f:
            doc = json.loads(line)
            if "context" in doc:
                tasks.setdefault(doc["task"], []).append(doc)
    for name, docs in tasks.items():
        lm_name = "iclp_" + re.sub(r"[^A-Za-z0-9]", "_", name)
        data = (a.out / f"{lm_name}.jsonl").resolve()
        with data.open("w") as f:
            for d in sorted(docs, key=lambda d: d["index"]):
                f.write(json.dumps(d) + "\n")
        body = MC if "gold" in docs[0] else LM
        head = (f"task: {lm_name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                "test_split: test\nnum_fewshot: 0\n")
        (a.out / f"{lm_name}.yaml").write_text(head + body + "metadata: {version: 1.0}\n")
        print(lm_name)


if __name__ == "__main__":
    main()
