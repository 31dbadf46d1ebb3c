#!/usr/bin/env bash
# The before/after table of docs/results.md: LoRA on each task family's real data (../shared/data),
# small budgets sized for 2 CPU cores. Usage: bash bench/task_families.sh [OUT_DIR] [extra overrides]
set -euo pipefail
out=${1:-runs/families}; shift || true
run() { local name=$1; shift; echo "== $name"; /usr/bin/time -f "$name wall %e s" tunelab train "$@" \
  train.progress=false eval.before=true output_dir="$out/$name" "${EXTRA[@]}"; }
EXTRA=("$@")
run paraphrase-mrpc examples/mrpc.yaml train.max_steps=100
run ner-conll-head examples/ner_conll_head.yaml train.max_steps=300 data.max_eval=1000
run qa-squad-head examples/qa_squad_head.yaml train.max_steps=300 data.max_eval=300
run reasoning-boolq examples/reasoning_boolq.yaml train.max_steps=150 data.max_eval=500
run reasoning-openbookqa examples/reasoning_openbookqa.yaml train.max_steps=150
run summarization-samsum examples/summarization_samsum.yaml train.max_steps=100 data.max_train=1000 data.max_eval=100 data.max_length=384
run generation-alpaca examples/generation_alpaca.yaml train.max_steps=100 eval.max_new_tokens=96
