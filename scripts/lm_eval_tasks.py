#!/usr/bin/env python3
"""Write lm-eval task YAMLs (icl_lambada, icl_piqa, icl_hellaswag, icl_winograd, icl_triviaqa) that read the local ICL JSONL files.

Usage:
    ~/.cache/icl/venv/bin/python scripts/lm_eval_tasks.py --data-dir /work/shared/data/icl --out DIR
then: lm_eval ... --include_path DIR --tasks icl_lambada,icl_piqa,icl_hellaswag

The prompt functions live in scripts/lm_eval_tasks/utils.py and are copied into DIR.

--fewshot-split: the tasks draw their shots from their own test split (`fewshot_split: test`, so lm-eval
removes the evaluated doc from its shots), the case `icl eval --fewshot-sampler lm-eval` reproduces;
language-modelling tasks then get `target_delimiter: ""` (their target already starts with the space), so
a shot reads `context + " " + continuation` as in icl's layout.
"""
import argparse
import json
import shutil
from pathlib import Path

LM = """output_type: loglikelihood
doc_to_text: !function utils.lm_context
doc_to_target: !function utils.lm_target
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
"""
MC = """output_type: multiple_choice
doc_to_text: !function utils.mc_context
doc_to_choice: !function utils.mc_choices
doc_to_target: !function utils.mc_gold
target_delimiter: " "
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""
# Schema tasks use lm-eval's "multiple input" mode: doc_to_text returns the gold index, doc_to_choice the
# contexts, and every context is scored with the same continuation (as lm-eval's winogrande does).
SCHEMA = """output_type: multiple_choice
doc_to_text: !function utils.schema_gold
doc_to_choice: !function utils.schema_contexts
doc_to_target: !function utils.schema_continuation
target_delimiter: " "
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""
# Generation as icl's generation_task_with_answers: greedy up to the first newline (icl: --stop '\n'),
# MAX_GEN_TOKS new tokens at most; shots show `answer` after `target_delimiter`.
GEN = """output_type: generate_until
doc_to_text: !function utils.gen_context
doc_to_target: !function utils.gen_answer
target_delimiter: " "
generation_kwargs: {until: ["\\n"], max_gen_toks: %d, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""
MAX_GEN_TOKS = 16
TASKS = {"icl_lambada": ("lambada_openai.jsonl", LM),
         "icl_piqa": ("piqa.jsonl", MC),
         "icl_hellaswag": ("hellaswag.jsonl", MC),
         "icl_winograd": ("winograd_wsc.jsonl", SCHEMA),
         "icl_triviaqa": ("triviaqa_small.jsonl", GEN % MAX_GEN_TOKS)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/icl"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fewshot-split", action="store_true", help="shots from the test split itself")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("lm_eval_tasks") / "utils.py", a.out / "utils.py")
    for task, (fname, body) in TASKS.items():
        data = (a.data_dir / fname).resolve()
        if not data.is_file():
            raise SystemExit(f"missing {data}")
        head = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                "test_split: test\n")
        if a.fewshot_split:
            # No num_fewshot here: lm-eval ignores --num_fewshot for a task whose config sets one.
            head += "fewshot_split: test\n" + ('target_delimiter: ""\n' if body is LM else "")
        else:
            head += "num_fewshot: 0\n"
        (a.out / f"{task}.yaml").write_text(head + body + "metadata: {version: 1.0}\n")
        print(a.out / f"{task}.yaml")


if __name__ == "__main__":
    main()
