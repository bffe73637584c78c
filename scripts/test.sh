#!/usr/bin/env bash
# The project's test command (CI runs exactly this): import contracts, then every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check -q cluster deployments router_models autoscaling tests benchmarks load_tests
.venv/bin/lint-imports
.venv/bin/python -X faulthandler -m pytest -p no:cacheprovider "$@"
