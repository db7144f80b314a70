#!/usr/bin/env python3
"""transformers' batched greedy `generate` on icl's prompts: the peer of `cargo xtask bench`'s
generation rows.

Usage:
    ~/.cache/icl/venv/bin/python scripts/generate_batched.py MODEL_DIR PROMPTS.jsonl OUT.jsonl BATCH DTYPE

PROMPTS comes from `icl eval --write-prompts` (generation lines: `context`, `max_new_tokens`, `stop`).
Prompts are encoded as icl encodes them (no special tokens, the last `max_length - max_new_tokens`
tokens kept), run BATCH at a time left-padded, greedy (do_sample=False, num_beams=1) with a stopping
criterion per row (a row is done at the end-of-text token or once its decoded new tokens hold a stop
sequence; the batch ends when every row is done or at max_new_tokens) in DTYPE (float32, bfloat16).
Writes {"task", "index", "output"} per prompt, `output` cut before the first stop sequence, and prints
the generation seconds (model loading excluded) on stdout.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList


class StopSequences(StoppingCriteria):
    """Per row: done once the decoded new tokens contain a stop sequence."""

    def __init__(self, tok, prompt_len, stops):
        self.tok, self.prompt_len, self.stops = tok, prompt_len, stops

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:].tolist(), skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


def main():
    model_dir, prompts, out, batch, dtype = sys.argv[1:6]
    batch, dtype = int(batch), getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    max_len = model.config.max_position_embeddings
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = eos if eos is not None else 0
    docs = [d for d in map(json.loads, open(prompts)) if "max_new_tokens" in d]
    start = time.perf_counter()
    with open(out, "w") as w:
        for first in range(0, len(docs), batch):
            part = docs[first : first + batch]
            max_new, stops = part[0]["max_new_tokens"], part[0]["stop"]
            ids = [(tok(d["context"], add_special_tokens=False)["input_ids"] or [pad])[-(max_len - max_new) :] for d in part]
            width = max(map(len, ids))
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
            criteria = StoppingCriteriaList([StopSequences(tok, width, stops)]) if stops else None
            with torch.no_grad():
                generated = model.generate(
                    input_ids,
                    attention_mask=mask,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new,
                    min_new_tokens=0,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    stopping_criteria=criteria,
                    use_cache=True,
                )
            for doc, row in zip(part, generated[:, width:].tolist()):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                text = tok.decode(row, skip_special_tokens=False)
                cut = min([text.find(s) for s in stops if s in text], default=len(text))
                w.write(json.dumps({"task": doc["task"], "index": doc["index"], "output": text[:cut]}) + "\n")
    print(f"{time.perf_counter() - start:.3f}")


if __name__ == "__main__":
    main()
