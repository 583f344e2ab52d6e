#!/usr/bin/env bash
# One prepared GPU check (under ~6 minutes on an H100/H200): the book's chapter-7 job three ways
# and the test-set generation (benchmarks/book_job.py), then train.py's --full-head and --compile
# variants if time allows. No network: random weights in Hugging Face's layout, embedded data.
# Each row prints as it finishes, so a cut-off run still reports what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout "${GPU_CHECK_SECONDS:-330}" python3 benchmarks/book_job.py --device cuda \
    --programs "${GPU_CHECK_PROGRAMS:-book,project,plain,generation,project:--full-head,project:--compile}" \
    ${OUT:+--json "$OUT/book_job.json"}
