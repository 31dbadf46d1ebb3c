#!/usr/bin/env bash
# llama.cpp verifies tunelab's GGUF export of a trained SmolLM2 run (a benchmark, not a CI test).
#
#   bench/llamacpp_check.sh [RUN_DIR]      (from the repository root)
#
# 1. Builds llama.cpp once (llama-tokenize, llama-simple, llama-perplexity, llama-quantize) from the
#    llama.cpp vendored in llama-cpp-python's source package (pip download; PyPI is the only source it
#    needs) and caches it under ~/.cache/tunelab-llamacpp (LLAMACPP_CACHE). Tens of minutes on 2 cores;
#    rerunning resumes an interrupted build (ninja).
# 2. Without RUN_DIR, trains examples/chat_smollm2.yaml for 20 steps on tunelab's demo conversations.
# 3. Exports f16 and q8_0 GGUFs with `tunelab export --format gguf` and runs bench/llamacpp_compare.py:
#    tokenization of 20 prompts, greedy agreement (f16), perplexity ratio (q8_0 vs the HF model).
# Result: bench/results/llamacpp_check.json (+ the llama.cpp version in it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
CACHE=${LLAMACPP_CACHE:-$HOME/.cache/tunelab-llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}   # vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG)
SRC=$CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp
BUILD=$CACHE/build
BIN=$BUILD/bin
mkdir -p "$CACHE/src"

if [ ! -x "$BIN/llama-perplexity" ] || [ ! -x "$BIN/llama-simple" ] || [ ! -x "$BIN/llama-tokenize" ]; then
  if [ ! -d "$SRC" ]; then
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/src"
    tar xzf "$CACHE/src/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE/src"
  fi
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON
  cmake --build "$BUILD" -j"$(nproc)" --target llama-tokenize llama-perplexity llama-quantize llama-completion llama-simple
fi

WORK=$CACHE/work
RUN=${1:-$WORK/run}
if [ ! -f "$RUN/method/method.json" ]; then
  "$PY" -m tunelab.data.demo_chat "$WORK/data"
  "$PY" -m tunelab train "$ROOT/examples/chat_smollm2.yaml" "data.train=$WORK/data/train.jsonl" \
    "data.eval=$WORK/data/dev.jsonl" data.max_eval=8 train.max_steps=20 eval.before=false train.progress=false \
    "output_dir=$RUN"
fi
OUT=$(mktemp -d "$WORK/export.XXXXXX")
"$PY" -m tunelab export "$RUN" "$OUT/f16" --format gguf --outtype f16
"$PY" -m tunelab export "$RUN" "$OUT/q8" --format gguf --outtype q8_0
name=$(basename "$(cd "$RUN" && pwd)")
mkdir -p "$ROOT/bench/results"
"$PY" "$ROOT/bench/llamacpp_compare.py" "$BIN" "$RUN" "$OUT/f16/$name-f16.gguf" "$OUT/q8/$name-q8_0.gguf" \
  "$ROOT/README.md" "$ROOT/bench/results/llamacpp_check.json"
"$PY" - "$ROOT/bench/results/llamacpp_check.json" "$VERSION" <<'EOF'
import json, sys
p = sys.argv[1]; r = json.load(open(p))
r["llama_cpp"] = f"llama.cpp vendored in llama-cpp-python {sys.argv[2]} (0.3.36: ggml-org/llama.cpp@0c1e57098), CPU build"
json.dump(r, open(p, "w"), indent=1, ensure_ascii=False)
EOF
rm -rf "$OUT"   # only the exports this run made
