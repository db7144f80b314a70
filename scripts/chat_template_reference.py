#!/usr/bin/env python3
"""Render chat templates with transformers, as the reference for icl's chat templates.

Usage: python scripts/chat_template_reference.py CASES.json OUT.json
CASES.json: a list of {"name", "messages", "add_generation_prompt", and either "template" (Jinja text,
with "special_tokens": {name: text}) or "model" (a model folder: its tokenizer's own template and
special tokens, through AutoTokenizer.apply_chat_template)}.
OUT.json: a list of {"name", "text"} or {"name", "error"} (the Jinja TemplateError's message), in order.
"""
import json
import sys

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template


def render(case):
    if "model" in case:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(case["model"])
        return tok.apply_chat_template(case["messages"], tokenize=False,
                                       add_generation_prompt=case["add_generation_prompt"])
    rendered, _ = render_jinja_template(conversations=[case["messages"]], chat_template=case["template"],
                                        add_generation_prompt=case["add_generation_prompt"],
                                        **case.get("special_tokens", {}))
    return rendered[0]


def main():
    cases = json.load(open(sys.argv[1], encoding="utf-8"))
    out = []
    for case in cases:
        try:
            out.append({"name": case["name"], "text": render(case)})
        except jinja2.exceptions.TemplateError as e:
            out.append({"name": case["name"], "error": str(e)})
    json.dump(out, open(sys.argv[2], "w", encoding="utf-8"), ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
