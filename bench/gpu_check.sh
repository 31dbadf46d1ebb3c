#!/usr/bin/env bash
# One GPU check for tunelab (never needed for CI). On a CUDA machine it runs, each step with a timeout:
#   1. the suite's CUDA-marked tests           (pytest -m cuda)
#   2. the speed benchmark vs PEFT and the HF Trainer in bf16 (bench/run.py, lora + full + qlora)
#   3. QLoRA through bitsandbytes: a 4-bit load (quantized while loading) + 8 training steps
# and prints one table (step, status, numbers). Without CUDA it says so and exits 0.
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to pick an interpreter
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False): nothing to check."
  exit 0
fi
declare -a ROWS
row() { ROWS+=("$(printf '| %-34s | %-6s | %s |' "$1" "$2" "$3")"); }

# 1. CUDA-marked tests
if timeout 600 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests >"$OUT/pytest.log" 2>&1; then s=ok; else s=FAIL; fi
row "pytest -m cuda" "$s" "$(tail -1 "$OUT/pytest.log")"

# 2. speed vs PEFT / HF Trainer, bf16
if timeout 1500 "$PY" bench/run.py --configs lora,full,qlora --device cuda --repeats 1 --steps 8 \
     --set train.precision=bf16 --out "$OUT/speed.json" >"$OUT/speed.log" 2>&1; then s=ok; else s=FAIL; fi
row "bench/run.py bf16 (lora,full,qlora)" "$s" "$("$PY" - "$OUT/speed.json" <<'PYEOF' 2>/dev/null || tail -1 "$OUT/speed.log"
import json, sys
d = json.load(open(sys.argv[1]))
res = d.get("results", d) if isinstance(d, dict) else d
out = []
for r in res if isinstance(res, list) else []:
    if isinstance(r, dict) and "config" in r:
        v = r.get("train_tokens_per_s") or r.get("tokens_per_s") or r.get("speed")
        out.append(f"{r['config']}/{r.get('impl', r.get('implementation', '?'))}: {v} tok/s, {r.get('peak_memory_mb')} MB")
print("; ".join(out) or "see " + sys.argv[1])
PYEOF
)"

# 3. QLoRA through bitsandbytes (4-bit load + steps)
if timeout 900 "$PY" - >"$OUT/qlora_bnb.log" 2>&1 <<'PYEOF'
import sys, time, torch
sys.path.insert(0, "tests")
from tiny_models import tiny
import tunelab
from tunelab import quant
from tunelab.methods.base import METHODS
from tunelab.models.loading import load
import tempfile
from conftest import tiny_tokenizer_obj
assert quant.bnb_available(), "bitsandbytes is not installed: pip install bitsandbytes"
d = tempfile.mkdtemp()
tiny("llama").save_pretrained(d); tiny_tokenizer_obj().save_pretrained(d)
plan = METHODS.get("qlora").quantize_on_load(tunelab.api.method_config("qlora", {"r": 8}))
torch.cuda.reset_peak_memory_stats()
model, _ = load(d, quantize=plan, device="cuda")
assert any(isinstance(m, quant.BnbLinear4) for m in model.modules()), "auto did not pick bitsandbytes on CUDA"
model = tunelab.attach(model, "qlora", r=8).cuda().train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(3, 128, (4, 32), device="cuda")
t = time.perf_counter()
for _ in range(8):
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
torch.cuda.synchronize()
print(f"RESULT loss {loss.item():.3f}, {8 / (time.perf_counter() - t):.1f} steps/s, "
      f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
PYEOF
then s=ok; else s=FAIL; fi
row "QLoRA via bitsandbytes (4-bit load)" "$s" "$(grep RESULT "$OUT/qlora_bnb.log" | sed 's/RESULT //' || true)$(grep -q RESULT "$OUT/qlora_bnb.log" || tail -1 "$OUT/qlora_bnb.log")"

echo
echo "| check                              | status | result |"
echo "|------------------------------------|--------|--------|"
printf '%s\n' "${ROWS[@]}"
echo
echo "logs: $OUT"
