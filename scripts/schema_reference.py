#!/usr/bin/env python3
"""Reference log-likelihoods of schema tasks, computed directly with transformers.

Usage:
    ~/.cache/icl/venv/bin/python scripts/schema_reference.py MODEL_DIR PROMPTS.jsonl OUT.jsonl

For every line of PROMPTS (from `icl eval --write-prompts`) that has `contexts` (a schema task), scores
the one target after each context with lm-evaluation-harness's encoding: the context's trailing white
space moves to the continuation; continuation tokens are those of enc(context + continuation) after
len(enc(context)); an empty context becomes the EOS token; the last max_length + 1 tokens are kept and
the final one dropped. Writes {"task", "index", "logliks"} per line (float32 model, CPU).
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, prompts, out = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    max_len = model.config.max_position_embeddings
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    with open(prompts) as f, open(out, "w") as w:
        for line in f:
            doc = json.loads(line)
            if "contexts" not in doc:
                continue
            target = doc["targets"][0]
            logliks = []
            for context in doc["contexts"]:
                kept = context.rstrip()
                cont = context[len(kept):] + target
                if kept:
                    ctx_ids = enc(kept)
                    cont_ids = enc(kept + cont)[len(ctx_ids):]
                else:
                    ctx_ids, cont_ids = [tok.eos_token_id], enc(cont)
                ids = (ctx_ids + cont_ids)[-(max_len + 1):][:-1]
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0].float()
                logp = torch.log_softmax(logits[-len(cont_ids):], dim=-1)
                logliks.append(float(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum()))
            w.write(json.dumps({"task": doc["task"], "index": doc["index"], "logliks": logliks}) + "\n")


if __name__ == "__main__":
    main()
