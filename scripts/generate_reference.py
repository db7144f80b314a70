#!/usr/bin/env python3
"""Greedy generations by transformers' `generate`, the reference for icl's KV-cache decoding.

Usage:
    ~/.cache/icl/venv/bin/python scripts/generate_reference.py models OUT.json MAX_NEW MODEL_DIR...
    ~/.cache/icl/venv/bin/python scripts/generate_reference.py prompts MODEL_DIR PROMPTS.jsonl OUT.jsonl

`models`: for each tiny model (made by scripts/make_models.py) the prompts are the real tokens of
the rows of its reference_logits.safetensors; writes {MODEL_DIR: [[new token ids], ...]}.

`prompts`: for every line of PROMPTS (from `icl eval --write-prompts`) of a generation task
(`max_new_tokens` and `stop` present), encodes the context without special tokens, keeps its last
`max_length - max_new_tokens` tokens and generates greedily until the end-of-text token, a stop
sequence in the decoded output, or max_new_tokens. Writes {"task", "index", "tokens", "output"} per
line, `output` being the decoded text cut before the first stop sequence.

Every prompt runs alone (batch size 1, no padding), f32 on CPU, do_sample=False, num_beams=1; the
end-of-text token is left out of `tokens`, as icl does.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList


class StopSequences(StoppingCriteria):
    """Stops once the decoded new tokens contain any stop sequence (batch size 1)."""

    def __init__(self, tok, prompt_len, stops):
        self.tok, self.prompt_len, self.stops = tok, prompt_len, stops

    def __call__(self, input_ids, scores, **kwargs):
        text = self.tok.decode(input_ids[0, self.prompt_len:].tolist(), skip_special_tokens=False)
        done = any(s in text for s in self.stops)
        return torch.tensor([done], dtype=torch.bool, device=input_ids.device)


def greedy(model, ids, max_new, eos, criteria=None):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new,
            min_new_tokens=0,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
            stopping_criteria=criteria,
            use_cache=True,
        )
    new = out[0, len(ids):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return new


def load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # The folder's generation_config.json must not add sampling, penalties or length limits.
    model.generation_config.do_sample = False
    model.generation_config.repetition_penalty = 1.0
    model.generation_config.max_length = None
    return model


def models_mode(out, max_new, dirs):
    result = {}
    for d in dirs:
        model = load(d)
        ref = load_file(str(Path(d) / "reference_logits.safetensors"))
        eos = model.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        rows = []
        for ids, n in zip(ref["input_ids"].tolist(), ref["lengths"].tolist()):
            rows.append(greedy(model, ids[:n], max_new, eos))
        result[d] = rows
    Path(out).write_text(json.dumps(result))


def prompts_mode(model_dir, prompts, out):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load(model_dir)
    max_len = getattr(model.config, "max_position_embeddings", None) or model.config.max_seq_len  # MPT: max_seq_len
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    with open(prompts) as f, open(out, "w") as w:
        for line in f:
            doc = json.loads(line)
            if "max_new_tokens" not in doc:
                continue
            max_new, stops = doc["max_new_tokens"], doc["stop"]
            ids = tok(doc["context"], add_special_tokens=False)["input_ids"]
            if not ids:
                ids = [eos]
            ids = ids[-(max_len - max_new):]
            criteria = StoppingCriteriaList([StopSequences(tok, len(ids), stops)]) if stops else None
            new = greedy(model, ids, max_new, eos, criteria)
            text = tok.decode(new, skip_special_tokens=False)
            cut = min([text.find(s) for s in stops if s in text], default=len(text))
            w.write(json.dumps({"task": doc["task"], "index": doc["index"], "tokens": new, "output": text[:cut]}) + "\n")


def main():
    mode = sys.argv[1]
    if mode == "models":
        models_mode(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    elif mode == "prompts":
        prompts_mode(*sys.argv[2:5])
    else:
        sys.exit(f"unknown mode {mode!r}: expected models or prompts")


if __name__ == "__main__":
    main()
