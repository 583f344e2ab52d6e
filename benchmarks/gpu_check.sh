#!/usr/bin/env bash
# One prepared GPU check (about 6 minutes on an H100, most of it the programs' start-up): the
# CUDA-graph tests, then the book's chapter-7 job five ways and the test-set generation
# (benchmarks/book_job.py), one table.
# No network: random weights in Hugging Face's layout, embedded data. Each row prints as it
# finishes, so a cut-off run still reports what it measured. $OUT (if set) gets the log and JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
timeout "${GPU_CHECK_SECONDS:-420}" python3 benchmarks/book_job.py --device cuda \
    --programs "${GPU_CHECK_PROGRAMS:-book,hf,plain,project,project:--no-cuda-graphs,generation}" \
    ${OUT:+--json "$OUT/book_job.json"}
