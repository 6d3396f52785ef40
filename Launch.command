#!/usr/bin/env bash
# macOS: double-click in Finder to start the LoRA studio (Terminal opens; close it to stop the app).
cd "$(dirname "$0")" && exec ./launch.sh "$@"
