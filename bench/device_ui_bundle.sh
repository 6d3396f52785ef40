#!/usr/bin/env bash
# The app's UI packages for the lent GPU machine, which has PyTorch, pandas and httpx but no gradio (and no
# registry): downloads the wheels of exactly the versions in .venv into .device/c (ignored by git, ~37 MB, under
# one call's 64 MiB) and writes .device/c/setup.sh, which installs them into .device/c/site there. Then, on the GPU
# machine once MLX is set up (bench/README.md), carrying [".device/c"]:
#     bash .device/c/setup.sh && export PYTHONPATH=$PYTHONPATH:$PWD/.device/c/site && python3 bench/ui_alternating.py ...
# Only what the GPU machine lacks is bundled (found by trial: gradio's imports there).
set -euo pipefail
cd "$(dirname "$0")/.."
packages="gradio gradio_client hf-gradio brotli fastapi starlette uvicorn h11 click groovy orjson pydantic
  pydantic_core annotated-types typing-inspection typing_extensions pydub python-multipart safehttpx
  semantic-version tomlkit opentelemetry-api pytest pluggy iniconfig pytz"
specs=()
for p in $packages; do
  specs+=("$p==$(.venv/bin/python -c "from importlib.metadata import version; print(version('$p'))")")
done
rm -rf .device/c && mkdir -p .device/c
.venv/bin/python -m pip download -q --no-deps -d .device/c --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "${specs[@]}"
cat > .device/c/setup.sh <<'EOF'
#!/usr/bin/env bash
# gradio and what it needs beyond the GPU machine's own packages, into site/ beside this file (bench/device_ui_bundle.sh)
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m pip install -q --no-deps --no-index --upgrade --target "$here/site" "$here"/*.whl
EOF
du -sh .device/c
