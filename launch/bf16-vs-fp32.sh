#!/usr/bin/env bash
# bf16 against fp32 on real text, several seeds each, for the three variants: the
# evidence behind "bf16 trains as well as fp32" (docs/training.md, "bf16 against fp32").
# WikiText-2 from tests/data/wikitext-2 (valid as the training split, test held out), a
# 1,024-token BPE trained on the training split, H=64, 2 layers, 4 heads, E=32 for
# ALGPT2, dropout 0.1, seq 64, batch 16, lr 3e-3 cosine to 3e-4 (100 warm-up steps),
# STEPS steps; validation loss over the whole held-out split at the end.
#   launch/bf16-vs-fp32.sh [STEPS] [--set key=value ...]   (default 2000 steps; the
#   overrides apply to every run, after the settings above)
# SEEDS (default "1 2 3"), VARIANTS (default "gpt2 sharing algpt2") and JOBS (runs at
# once, one math thread each; default: the cores) narrow or widen it; ALGPT2_BIN runs
# another binary (default: the release build). Runs that finished are reused
# (checkpoint.resume=auto resumes a longer STEPS from them). Table: target/bf16-vs-fp32/results.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -z "${ALGPT2_BIN:-}" ]; then ensure_release_build; fi
bin="${ALGPT2_BIN:-$BIN_RELEASE}"
cd "$ROOT"
steps="${1:-2000}"
shift $(( $# < 1 ? $# : 1 ))
overrides="$*"
seeds="${SEEDS:-1 2 3}"
variants="${VARIANTS:-gpt2 sharing algpt2}"
jobs="${JOBS:-$(nproc)}"
work="$ROOT/target/bf16-vs-fp32"
mkdir -p "$work/logs"
data="$ROOT/tests/data/wikitext-2"

run_one() {  # variant seed precision
  local variant=$1 seed=$2 precision=$3 share e
  case "$variant" in
    gpt2) share=false e=null ;;
    sharing) share=true e=null ;;
    algpt2) share=true e=32 ;;
    *) echo "bf16-vs-fp32.sh: unknown variant '$variant' in VARIANTS (gpt2 sharing algpt2)" >&2; return 2 ;;
  esac
  local name="$variant-s$seed-$precision"
  OMP_NUM_THREADS=1 "$bin" --config configs/wikitext103.yaml \
    --set device=cpu --set wandb.mode=disabled --set checkpoint.resume=auto --set checkpoint.keep_last=1 \
    --set data.format=wikitext --set "data.train=$data/wiki.valid.tokens" --set "data.valid=$data/wiki.test.tokens" \
    --set data.test=null --set "data.cache_dir=$work/cache" --set "out_dir=$work/runs" --set "run_name=$name" \
    --set tokenizer.vocab_size=1024 --set model.vocab_size=1024 --set model.n_positions=64 \
    --set model.n_embd=64 --set model.n_head=4 --set model.n_layer=2 --set model.dropout=0.1 \
    --set "model.share_layers=$share" --set "model.embedding_size=$e" \
    --set train.seq_len=64 --set train.micro_batch_size=16 --set "train.max_steps=$steps" --set "train.seed=$seed" \
    --set "train.precision=$precision" --set train.log_interval=100 --set "train.eval_interval=$((steps / 4))" \
    --set train.eval_steps=0 --set "train.save_interval=$steps" \
    --set optim.lr=3e-3 --set optim.min_lr=3e-4 --set optim.warmup_steps=100 --set optim.schedule=cosine \
    $overrides > "$work/logs/$name.log" 2>&1 || { echo "bf16-vs-fp32.sh: $name failed, see $work/logs/$name.log" >&2; return 1; }
  echo "done $name" >&2
}
export -f run_one
export bin work data steps ROOT overrides

# The token cache first, once, so that the parallel runs only read it.
"$bin" prepare --config configs/wikitext103.yaml --set data.format=wikitext \
  --set "data.train=$data/wiki.valid.tokens" --set "data.valid=$data/wiki.test.tokens" --set data.test=null \
  --set "data.cache_dir=$work/cache" --set tokenizer.vocab_size=1024 --set model.vocab_size=1024 \
  > "$work/logs/prepare.log" 2>&1

runs=()
for v in $variants; do for s in $seeds; do for p in fp32 bf16; do runs+=("$v $s $p"); done; done; done
printf '%s\n' "${runs[@]}" | xargs -P "$jobs" -L 1 bash -c 'run_one $0 $1 $2'

python3 - "$work" "$steps" "$seeds" "$variants" <<'PY' | tee "$work/results.md"
import json, statistics, sys, pathlib
work, steps, seeds, variants = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
def final(variant, seed, precision):
    rows = [json.loads(l) for l in open(work / "runs" / f"{variant}-s{seed}-{precision}" / "metrics.jsonl")]
    vals = [r for r in rows if "val/loss" in r and r["step"] == steps]
    return vals[-1]["val/loss"]
print(f"| variant | fp32 val loss by seed | bf16 val loss by seed | fp32 mean ± sd | bf16 mean ± sd | bf16 − fp32 (mean) |")
print("|---|---|---|---|---|---|")
for v in variants:
    f = [final(v, s, "fp32") for s in seeds]
    b = [final(v, s, "bf16") for s in seeds]
    sd = lambda x: statistics.stdev(x) if len(x) > 1 else 0.0
    mf, mb = statistics.mean(f), statistics.mean(b)
    print(f"| {v} | {', '.join(f'{x:.4f}' for x in f)} | {', '.join(f'{x:.4f}' for x in b)} | "
          f"{mf:.4f} ± {sd(f):.4f} | {mb:.4f} ± {sd(b):.4f} | {100 * (mb - mf) / mf:+.2f}% |")
PY
