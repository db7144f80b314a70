#!/usr/bin/env bash
# A separate venv with llm-foundry 0.22.0's evaluator, for scripts/llm_foundry_eval.py (the check of icl
# against llm-foundry itself). Idempotent: a second run with the same pins only checks the imports.
#
# Usage: scripts/setup_llm_foundry.sh
#   env: ICL_FOUNDRY_VENV  the venv to make (default ~/.cache/icl/foundry-venv)
#        ICL_VENV          the project's venv from `cargo xtask setup` (default ~/.cache/icl/venv), whose
#                          torch 2.11 this venv uses
#        PYTHON            interpreter for the venv (default python3)
#
# llm-foundry 0.22.0 pins torch 2.7.0, which PyPI ships only as the CUDA 12 build: with the CUDA 12
# libraries Python's `import torch` links against that is about 5 GB more on disk. Instead this venv
# uses the project's own torch 2.11 (the libtorch icl runs on, so the two sides share kernels): a
# `.pth` file puts a folder of symlinks to it (torch, torchgen, functorch, nvidia) on sys.path, with a
# copy of torch's METADATA but no RECORD, so transformers sees torch's version and pip can never
# uninstall the linked files. Everything that depends on torch is then installed with --no-deps, the
# rest with its dependencies; llm-foundry 0.22.0 and Composer 0.32.1 run on torch 2.11 for everything
# the ICL evaluator touches (their pins say <2.7.1; `pip check` reports that, and nothing breaks).
# Left out because the evaluator never imports them: onnx, onnxruntime, boto3 and the cloud SDKs of
# mosaicml-streaming, sentencepiece, slack-sdk, mlflow's server (mlflow-skinny is enough).
set -euo pipefail

VENV=${ICL_FOUNDRY_VENV:-$HOME/.cache/icl/foundry-venv}
MAIN_VENV=${ICL_VENV:-$HOME/.cache/icl/venv}
PYTHON=${PYTHON:-python3}
WHEEL_DIR=$HOME/.cache/icl
WHEEL=$WHEEL_DIR/llm_foundry-0.22.0-py3-none-any.whl

# Resolved by pip with their dependencies (none of them needs torch).
DEPS=(
  "filelock" "typing-extensions>=4.10.0" "setuptools<82" "sympy>=1.13.3" "networkx>=2.5.1" "jinja2"
  "transformers==4.51.3" "huggingface-hub==0.33.5" "datasets==3.6.0" "fsspec==2023.6.0"
  "omegaconf==2.3.0" "numpy==2.1.3" "pyyaml" "tqdm" "requests" "psutil" "coolname==2.2.0"
  "tabulate==0.9.0" "py-cpuinfo==9.0.0" "packaging==24.2" "importlib-metadata==8.9.0" "pillow==11.3.0"
  "lightning-utilities==0.15.3" "catalogue==2.0.10" "einops==0.8.1" "tenacity==9.2.1"
  "mosaicml-cli==0.7.5" "Brotli" "xxhash==3.8.2" "zstd==1.5.7.2" "python-snappy==0.7.3"
  "GitPython==3.1.44" "typer<1" "mlflow-skinny==2.22.5" "beautifulsoup4==4.15.0"
)
# Packages that require torch: installed without dependencies, so pip never pulls torch 2.7 + CUDA in.
# torchvision 0.26.0 is the build for torch 2.11 (Composer imports its transforms at start-up).
NO_DEPS=("mosaicml==0.32.1" "mosaicml-streaming==0.12.0" "torchmetrics==1.7.4" "accelerate==1.8.1" "torchvision==0.26.0")

main_site=$(ls -d "$MAIN_VENV"/lib/python3*/site-packages 2>/dev/null | head -n1)
torch_info=$(ls -d "$main_site"/torch-*.dist-info 2>/dev/null | head -n1)
if [[ -z "$main_site" || ! -d "$main_site/torch" || -z "$torch_info" ]]; then
  echo "setup_llm_foundry: no torch in $MAIN_VENV (run \`cargo xtask setup\` first, or set ICL_VENV)" >&2
  exit 1
fi
if [[ ! -f "$WHEEL" ]]; then
  "$MAIN_VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps llm-foundry==0.22.0 -d "$WHEEL_DIR"
fi

spec="$(basename "$torch_info") ${DEPS[*]} ${NO_DEPS[*]} $(sha256sum "$WHEEL" | cut -d' ' -f1)"
stamp=$VENV/icl-foundry-setup.txt
check() {
  (cd / && "$VENV/bin/python" -c "import llmfoundry, composer, torch, transformers
from llmfoundry.command_utils import evaluate
assert llmfoundry.__version__ == '0.22.0', llmfoundry.__version__
assert transformers.__version__ == '4.51.3', transformers.__version__")
}
# Quick path: same pins, links intact, llm-foundry's metadata in place (the full import check takes a while).
if [[ -f "$stamp" && "$(cat "$stamp")" == "$spec" && -e "$VENV/icl-torch/torch/__init__.py" ]] &&
  "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('llm-foundry') == '0.22.0'" 2>/dev/null; then
  echo "setup_llm_foundry: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
links=$VENV/icl-torch
mkdir -p "$links"
for d in torch torchgen functorch nvidia; do
  if [[ -e "$main_site/$d" ]]; then ln -sfn "$main_site/$d" "$links/$d"; fi
done
rm -rf "$links"/torch-*.dist-info
mkdir -p "$links/$(basename "$torch_info")"
cp "$torch_info/METADATA" "$links/$(basename "$torch_info")/"
cp "$torch_info/top_level.txt" "$links/$(basename "$torch_info")/" 2>/dev/null || true
echo "$links" >"$site/icl-torch.pth"

pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
"${pip[@]}" "${DEPS[@]}"
"${pip[@]}" --no-deps "${NO_DEPS[@]}" "$WHEEL"
check
echo "$spec" >"$stamp"
echo "setup_llm_foundry: $VENV ready ($(du -sh "$VENV" | cut -f1), torch linked from $MAIN_VENV)"
