#!/usr/bin/env bash
# The offline demo: build a tiny model and data, then train, evaluate (base vs adapter vs
# merged) and merge, and check that held-out perplexity dropped and merged == adapter.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python -m lora_tune.tiny demo
rm -rf runs/tiny-demo merged/tiny-demo
lora-tune data recipes/tiny-demo.yaml --samples 2
lora-tune train recipes/tiny-demo.yaml
lora-tune eval runs/tiny-demo --compare --samples 3 --json runs/tiny-demo/eval.json --plot runs/tiny-demo/loss.png
lora-tune merge runs/tiny-demo -o merged/tiny-demo

python - <<'PY'
import json, sys
report = json.load(open("runs/tiny-demo/eval.json"))
base, merged = report["results"]["base"], report["results"]["merged"]
check = report["merged_vs_adapter"]
merge = json.load(open("merged/tiny-demo/merge_report.json"))
print(f"held-out perplexity: base {base['perplexity']:.1f} -> fine-tuned {merged['perplexity']:.1f}; "
      f"answer token F1: {base['token_f1']:.2f} -> {merged['token_f1']:.2f}; "
      f"merged vs adapter max |logit diff| {check['max_abs_diff']:.2g} (eval), {merge['max_abs_diff']:.2g} (merge)")
ok = merged["perplexity"] < 0.8 * base["perplexity"] and merged["token_f1"] > base["token_f1"] and check["ok"] \
    and merge["ok"]
print("demo OK: the merged model is in merged/tiny-demo" if ok else "demo FAILED")
sys.exit(0 if ok else 1)
PY
