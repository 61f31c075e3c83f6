#!/usr/bin/env bash
# Benchmark of `algpt2-ddp prepare` beside Python `tokenizers` (PyPI) on the same ~100 MB
# file, in one run: the WikiText-2 valid + test splits in tests/data, repeated to ~100 MB.
#   1. our prepare trains the tokenizer (BPE, 50257) and encodes (timing of each logged);
#   2. our prepare again with that tokenizer loaded: encode only, MB/s and peak memory;
#   3. Python tokenizers encodes the same file with the same tokenizer.json the same way.
# Prints a table; the README's figures come from it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$ROOT/launch/setup.sh" --release
cd "$ROOT"
work="$ROOT/target/bench-prepare"
mkdir -p "$work"
corpus="$work/wiki.train.tokens"
if [ ! -s "$corpus" ]; then
  : > "$corpus"
  while [ "$(stat -c %s "$corpus")" -lt 100000000 ]; do
    cat tests/data/wikitext-2/wiki.valid.tokens tests/data/wikitext-2/wiki.test.tokens >> "$corpus"
  done
fi
mb=$(( $(stat -c %s "$corpus") / 1000000 ))
cat > "$work/train-tokenizer.yaml" <<YAML
data: {format: wikitext, train: $corpus, cache_dir: $work/cache}
YAML
echo "corpus: $corpus ($mb MB), $(nproc) cores"
"$BIN_RELEASE" prepare --config "$work/train-tokenizer.yaml" --force 2>&1 | grep -E "trained|train:"
tok=$(ls -d "$work"/cache/*/tokenizer.json | head -1)
cp "$tok" "$work/tokenizer.json"
cat > "$work/encode-only.yaml" <<YAML
data: {format: wikitext, train: $corpus, cache_dir: $work/cache-encode}
tokenizer: {path: $work/tokenizer.json}
YAML
ours=$( { /usr/bin/time -f 'peak_rss_kb=%M' "$BIN_RELEASE" prepare --config "$work/encode-only.yaml" --force; } 2>&1 )
ours_mbs=$(grep -oE 'train: .* \(([0-9.]+) MB/s\)' <<<"$ours" | grep -oE '[0-9.]+ MB/s' | cut -d' ' -f1)
ours_rss=$(( $(grep -oE 'peak_rss_kb=[0-9]+' <<<"$ours" | cut -d= -f2) / 1024 ))
# What the process holds before any work: libtorch and the CUDA libraries, mapped at load.
base_rss=$(( $( { /usr/bin/time -f 'peak_rss_kb=%M' "$BIN_RELEASE" info --config configs/quickstart.yaml >/dev/null; } 2>&1 | grep -oE '[0-9]+$') / 1024 ))
py_base=$(python -c "import resource, numpy, tokenizers; print(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))")
py=$(python "$ROOT/reference/bench_prepare.py" "$work/tokenizer.json" "$corpus" "$work/python.bin")
py_mbs=$(python -c "import json,sys; print(round(json.loads(sys.argv[1])['mb_per_s'], 1))" "$py")
py_rss=$(python -c "import json,sys; print(round(json.loads(sys.argv[1])['peak_rss_mb']))" "$py")
ours_bin=$(ls "$work"/cache-encode/*/train.bin)
if cmp -s <(tail -c +65 "$ours_bin" | head -c -2) "$work/python.bin"; then same=identical; else same=DIFFERENT; fi
printf '\n| encoder | MB/s | peak RSS (MB) | RSS at start (MB) | peak above start (MB) |\n|---|---|---|---|---|\n'
printf '| algpt2-ddp prepare | %s | %s | %s | %s |\n' "$ours_mbs" "$ours_rss" "$base_rss" "$((ours_rss - base_rss))"
printf '| Python tokenizers %s | %s | %s | %s | %s |\n' "$(python -c 'import tokenizers; print(tokenizers.__version__)')" "$py_mbs" "$py_rss" "$py_base" "$((py_rss - py_base))"
printf '\nratio (ours / Python): %s; token streams: %s\n' "$(python -c "print(round($ours_mbs / $py_mbs, 2))")" "$same"
