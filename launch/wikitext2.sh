#!/usr/bin/env bash
# The three variants on WikiText-2 (tests/data/wikitext-2: valid as the training set, test as
# the held-out set), small enough for a CPU: H=128, 4 layers, 4 heads, E=64 for ALGPT2,
# a 4096-token BPE trained on the training split, seq 128, batch 16, STEPS steps (300).
# Prints each variant's parameter count and validation perplexity at each evaluation.
#   launch/wikitext2.sh [STEPS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$ROOT/launch/setup.sh" --release
cd "$ROOT"
steps="${1:-300}"
work="$ROOT/target/wikitext2"
mkdir -p "$work"
shared="$ROOT/tests/data/wikitext-2"
printf '| variant | parameters | val ppl by step |\n|---|---|---|\n'
for variant in gpt2:false:null shared:true:null algpt2:true:64; do
  IFS=: read -r name share e <<<"$variant"
  sets=(--set device=cpu --set wandb.mode=disabled --set checkpoint.resume=auto
        --set data.format=wikitext --set "data.train=$shared/wiki.valid.tokens" --set "data.valid=$shared/wiki.test.tokens"
        --set data.test=null --set "data.cache_dir=$work/cache" --set "out_dir=$work/runs" --set "run_name=$name"
        --set tokenizer.vocab_size=4096 --set model.vocab_size=4096 --set model.n_positions=128
        --set model.n_embd=128 --set model.n_head=4 --set model.n_layer=4 --set model.dropout=0.1
        --set "model.share_layers=$share" --set "model.embedding_size=$e"
        --set train.seq_len=128 --set train.micro_batch_size=16 --set "train.max_steps=$steps"
        --set train.log_interval=50 --set "train.eval_interval=$((steps / 3))" --set train.eval_steps=0
        --set "train.save_interval=$steps" --set optim.lr=2e-3 --set optim.warmup_steps=30 --set optim.schedule=cosine
        --set optim.min_lr=2e-4)
  rm -rf "$work/runs/$name"
  "$BIN_RELEASE" --config configs/wikitext103.yaml "${sets[@]}" > "$work/$name.log" 2>&1
  params=$("$BIN_RELEASE" info --config configs/wikitext103.yaml "${sets[@]}" --json |
           python -c 'import json, sys; print(format(json.load(sys.stdin)["parameters"], ","))')
  ppl=$(python - "$work/runs/$name/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(", ".join("%d: %.1f" % (r["step"], r["val/ppl"]) for r in rows if "val/ppl" in r))
PY
)
  printf '| %s | %s | %s |\n' "$name" "$params" "$ppl"
done
