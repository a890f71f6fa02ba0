#!/usr/bin/env bash
# Wheels for the lent GPU machine (x86-64, Python 3.12, no network; torch, transformers,
# tokenizers, safetensors, accelerate, peft, huggingface_hub, scipy, sentencepiece,
# protobuf, tqdm, click, pyyaml and pytest are already there; `datasets`, which mergekit
# lists, is not, and no merge imports it): mergekit 0.1.5 and the dependencies that image
# lacks (typing_extensions too: pydantic 2.14.4 needs >= 4.16.0), and this package, into
# .whl/ (ignored by git). Then run benchmarks/cuda_checks.sh there as
# its header says.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl mergekit==0.1.5 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
    typing_inspection==0.4.5 immutables==0.21 typing_extensions==4.16.0
python3 -m pip wheel -q --no-deps -w .whl .
ls -1 .whl
du -sh .whl
