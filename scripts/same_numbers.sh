#!/usr/bin/env bash
# Do two builds of amoe compute the same numbers? For a refactor that must
# not change results: each binary trains two small models (adaptive + GELU +
# curriculum; SwiGLU + a dense layer + top-2 + capacity factor) and generates
# from the demo checkpoint under top1, top2 and adaptive with --logits, on
# every backend given; then every metric (timings left out), the final
# weights (sha256) and every generated id, route and logit are compared.
#
#   scripts/same_numbers.sh OLD_BINARY NEW_BINARY [BACKENDS, default "vulkan gl"]
#
# Prints SAME/DIFF per item and exits 1 on any difference.
set -u
cd "$(dirname "$0")/.."
OLD=$1; NEW=$2; BACKENDS=${3:-vulkan gl}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
WORK=$(mktemp -d)
DATA=web/assets/sonnets.txt
MODEL=(--data $DATA --d 64 --layers 2 --heads 2 --experts 4 --ffn 64 --context 32 --batch 4 --vocab 512
       --steps 6 --eval-every 3 --eval-batches 2)
run() { # BIN OUT
    local bin=$1 out=$2
    mkdir -p "$out"
    for be in $BACKENDS; do
        "$bin" train --backend "$be" "${MODEL[@]}" --out "$out/run-$be-a" > /dev/null 2>&1
        "$bin" train --backend "$be" "${MODEL[@]}" --activation swiglu --moe-every 2 --gating top2 \
            --capacity-factor 1.0 --out "$out/run-$be-b" > /dev/null 2>&1
        for r in a b; do
            python3 -c "
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    for k in ('wall_s', 'tokens_per_s', 'step_s', 'elapsed_s'):
        m.pop(k, None)
    print(json.dumps(m, sort_keys=True))" "$out/run-$be-$r/metrics.jsonl" > "$out/metrics-$be-$r.txt"
            sha256sum < "$out/run-$be-$r/checkpoint/model.safetensors" > "$out/model-$be-$r.sha"
        done
        for g in top1 top2 adaptive; do
            "$bin" generate --backend "$be" --gating $g --prompt "Shall I compare thee" \
                --max-tokens 24 --json --logits 2>/dev/null | python3 -c "
import json, sys
j = json.load(sys.stdin)
for k in list(j):
    if k.endswith('_s') or k.endswith('tps'):
        j.pop(k)
print(json.dumps(j, sort_keys=True))" > "$out/gen-$be-$g.json"
        done
    done
}
run "$OLD" "$WORK/old"
run "$NEW" "$WORK/new"
status=0
for f in $(cd "$WORK/old" && ls *.txt *.sha *.json); do
    if [ -s "$WORK/old/$f" ] && cmp -s "$WORK/old/$f" "$WORK/new/$f"; then
        echo "SAME $f"
    else
        echo "DIFF $f"
        status=1
    fi
done
rm -rf "$WORK"
exit $status
