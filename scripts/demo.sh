#!/usr/bin/env bash
# The offline demo: build a tiny model and data, then train, evaluate (base vs adapter vs
# merged) and merge, and check that held-out perplexity dropped and merged == adapter. Then the
# preference stage: DPO from the SFT adapter, checked to start at ln 2 and to rank held-out
# chosen answers above rejected ones far more often than the SFT model does. Last the GRPO stage:
# from the SFT adapter again, rewarded for the exact answer, checked to answer more held-out
# prompts exactly than the SFT model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python -m lora_tune.tiny demo
rm -rf runs/tiny-demo merged/tiny-demo runs/tiny-demo-dpo merged/tiny-demo-dpo \
  runs/tiny-demo-grpo merged/tiny-demo-grpo
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

lora-tune data recipes/tiny-demo-dpo.yaml --samples 1
lora-tune train recipes/tiny-demo-dpo.yaml
lora-tune eval runs/tiny-demo runs/tiny-demo-dpo --data demo/data/pref_eval.jsonl --json runs/tiny-demo-dpo/eval.json
lora-tune merge runs/tiny-demo-dpo -o merged/tiny-demo-dpo

python - <<'PY'
import json, math, sys
report = json.load(open("runs/tiny-demo-dpo/eval.json"))
sft, dpo = report["results"]["runs/tiny-demo merged"], report["results"]["runs/tiny-demo-dpo merged"]
first = json.load(open("runs/tiny-demo-dpo/metrics.json"))["method"]["first_logged_loss"]
merge = json.load(open("merged/tiny-demo-dpo/merge_report.json"))
print(f"DPO first loss {first:.6f} (ln 2 = {math.log(2):.6f}: the SFT model is the reference); held-out "
      f"preference accuracy: SFT {sft['preference_accuracy']:.0%} -> DPO {dpo['preference_accuracy']:.0%}, "
      f"margin {sft['margin']:+.2f} -> {dpo['margin']:+.2f}; merged vs adapter max |logit diff| {merge['max_abs_diff']:.2g}")
ok = abs(first - math.log(2)) < 1e-3 and dpo["preference_accuracy"] >= sft["preference_accuracy"] + 0.3 \
    and merge["ok"]
print("preference stage OK: the merged DPO model is in merged/tiny-demo-dpo" if ok else "preference stage FAILED")
sys.exit(0 if ok else 1)
PY

lora-tune data recipes/tiny-demo-grpo.yaml --samples 1
lora-tune train recipes/tiny-demo-grpo.yaml
lora-tune eval runs/tiny-demo runs/tiny-demo-grpo --data demo/data/prompts_eval.jsonl --sampled 4 \
  --json runs/tiny-demo-grpo/eval.json
lora-tune merge runs/tiny-demo-grpo -o merged/tiny-demo-grpo

python - <<'PY'
import json, sys
report = json.load(open("runs/tiny-demo-grpo/eval.json"))
sft, grpo = report["results"]["runs/tiny-demo merged"], report["results"]["runs/tiny-demo-grpo merged"]
method = json.load(open("runs/tiny-demo-grpo/metrics.json"))["method"]
merge = json.load(open("merged/tiny-demo-grpo/merge_report.json"))
print(f"GRPO training reward (sampled): first step {method['first_logged_reward']:.2f}, last logged "
      f"{method['reward']:.2f}; held-out exact-match reward of greedy answers: SFT {sft['reward']:.2f} -> "
      f"GRPO {grpo['reward']:.2f} (sampled x4: {sft['sampled_reward']:.2f} -> {grpo['sampled_reward']:.2f}); "
      f"merged vs adapter max |logit diff| {merge['max_abs_diff']:.2g}")
ok = grpo["reward"] >= sft["reward"] + 0.1 and merge["ok"]
print("GRPO stage OK: the merged GRPO model is in merged/tiny-demo-grpo" if ok else "GRPO stage FAILED")
sys.exit(0 if ok else 1)
PY
