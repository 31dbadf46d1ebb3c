"""llama.cpp against tunelab on one trained run's GGUF exports (called by bench/llamacpp_check.sh).

    python bench/llamacpp_compare.py BIN_DIR RUN F16_GGUF Q8_GGUF TEXT_FILE OUT_JSON

1. tokenization: ``llama-tokenize --ids`` of 20 prompts == the run's Hugging Face tokenizer's ids;
2. greedy: ``llama-simple`` (greedy sampler) on the f16 GGUF vs tunelab's merged model (fp32, greedy) on
   10 chat prompts: how many of the first N=16 new tokens agree (the continuations tokenized by HF);
3. perplexity: ``llama-perplexity`` (q8_0, context 128, scoring each chunk's second half) vs the merged
   HF model on the same chunks and positions.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch

PROMPTS = [
    "Hello world", "The cat sat on the mat.", "  leading spaces and\ttabs", "numbers 1 12 123 1234 12345 3.14159",
    "I've been told he's there, 'RE you sure? We'Ve a'lL", "Ünïcödé: café, naïve, Straße", "emoji 🚀🦙 ✅ done",
    "中文 你好 世界 and 日本語", "code: def f(x):\n    return x ** 2\n", "multiple\n\n\nnewlines\n",
    "<|im_start|>user\nhi<|im_end|>\n", "URL https://example.com/a?b=c&d=e", "tabs\t\tand  double  spaces",
    "CAPITALS AND lower MiXeD", "punctuation!!! ??? ... ---", "'quoted' \"double\" `back`", "a" * 40,
    "Привет, как дела?", "x=1;y=2;z=x+y", "The end.",
]
CHATS = ["What is the capital of France?", "Tell me a fun fact about cats.", "How do I boil an egg?",
         "Say hello in Spanish.", "What is 2 + 2?", "Name three colours.", "Why is the sky blue?",
         "Give me a synonym for happy.", "What day comes after Monday?", "Write a haiku about rain."]
N_GREEDY, N_CTX = 16, 128


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def llama_ids(bin_dir: Path, gguf: Path, text: str) -> list[int]:
    out = run([str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-p", text, "--ids", "--log-disable"])
    return ast.literal_eval(out.strip().splitlines()[-1])


def main() -> None:
    bin_dir, run_dir, f16, q8, text_file, out_json = (Path(a) for a in sys.argv[1:7])
    from tunelab.export.merge import merged
    from tunelab.training.run_directory import load_trained

    model, tok, _ = load_trained(run_dir, dtype="float32")
    model = merged(model, model.tunelab_method["name"]).eval()
    res: dict = {"tokenize": [], "greedy": []}
    for p in PROMPTS:
        want, got = tok(p).input_ids, llama_ids(bin_dir, f16, p)
        res["tokenize"].append({"prompt": p, "equal": want == got, "hf": want, "llama": got})
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for q in CHATS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=N_GREEDY, do_sample=False, eos_token_id=end, pad_token_id=end)
        hf_new = out[0, ids.shape[1]:].tolist()
        text = run([str(bin_dir / "llama-simple"), "-m", str(f16), "-n", str(N_GREEDY), prompt])
        cont = text[len(prompt):] if text.startswith(prompt) else text
        cont = cont[:-1] if cont.endswith("\n") else cont
        ll_new = tok(cont, add_special_tokens=False).input_ids
        if hf_new and hf_new[-1] == end:
            hf_cmp = hf_new[:-1]  # llama-simple stops at end-of-generation without printing it
        else:
            hf_cmp = hf_new
        agree = next((i for i, (a, b) in enumerate(zip(hf_cmp, ll_new, strict=False)) if a != b), min(len(hf_cmp), len(ll_new)))
        res["greedy"].append({"prompt": q, "agree": agree, "of": len(hf_cmp), "hf": tok.decode(hf_cmp), "llama": cont})
    ppl_out = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(q8), "-f", str(text_file), "-c", str(N_CTX),
                              "-b", str(N_CTX)], capture_output=True, text=True, check=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", ppl_out.stdout + ppl_out.stderr)
    chunks = int(re.search(r"calculating perplexity over (\d+) chunks", ppl_out.stdout + ppl_out.stderr).group(1))
    ids = tok(text_file.read_text(), add_special_tokens=False).input_ids
    nll, count = 0.0, 0
    for c in range(chunks):
        chunk = torch.tensor([ids[c * N_CTX:(c + 1) * N_CTX]])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits[0].float(), -1)
        for j in range(N_CTX // 2, N_CTX - 1):
            nll -= float(logp[j, chunk[0, j + 1]])
            count += 1
    res["perplexity"] = {"llama_q8_0": float(m.group(1)), "hf_fp32": math.exp(nll / count), "chunks": chunks,
                         "n_ctx": N_CTX, "text": text_file.name}
    res["perplexity"]["ratio"] = res["perplexity"]["llama_q8_0"] / res["perplexity"]["hf_fp32"]
    res["summary"] = {"tokenize_equal": f"{sum(r['equal'] for r in res['tokenize'])}/{len(PROMPTS)}",
                      "greedy_agree_tokens": f"{sum(r['agree'] for r in res['greedy'])}/{sum(r['of'] for r in res['greedy'])}",
                      "greedy_all_equal": f"{sum(r['agree'] == r['of'] for r in res['greedy'])}/{len(CHATS)}",
                      "ppl_ratio": round(res["perplexity"]["ratio"], 4)}
    Path(out_json).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
