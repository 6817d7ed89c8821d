#!/usr/bin/env bash
# benchmarks/gpu_check.py with the repository's venv (PYTHON=/path/to/python to use another).
cd "$(dirname "$0")/.." && exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
