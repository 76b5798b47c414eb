# The reproduction issue's runs, one stage per call, each resumable (finished runs are kept and skipped).
# From the repo root after setup.sh, in its own session (or it dies with the command that started it):
#   setsid nohup bash docs/results/2026-12-02-reproduction-pending/reproduce.sh STAGE [ARG] > /root/job.out 2>&1 < /dev/null &
# Stages, in order (W=/root/w by default; bring $W back without checkpoints after each session and send it again):
#   restore           copy the committed results of earlier sessions (RESULTS, below) into $W, keeping what is there
#   sweep             full training at 4 rates x 2 seeds (sweep.sh); `lr` prints the rate it picks
#   main LAYERS       the main scan at the picked rate, grown session by session: 0-9, then 0-19, then all
#   edge [LAYERS]     a few layers (default 0,5,9) at 10x, 2 seeds: part 1 found every layer's best rate at 3x, the grid's
#                     top; compare their accuracy with the main scan's 3x runs (its own C is against full at 10x)
#   second LAYERS     rg:chain_sum at 2-3 one-digit terms (CHAIN), the same protocol, 1 seed; `passk` checks the base
#                     model's pass@8 there (0.48 on 50 problems on a CPU; the defaults' 0.07 is below the issue's 0.2)
#   code              code:synth difficulty 2, every third layer, 1 seed (needs bubblewrap, prlimit, libseccomp)
#   ood               every third layer, 1 seed, on the main task, then evaluated on chain_sum in the same session
#                     (out-of-domain evaluation needs checkpoints, and checkpoints do not come back)
#   strategies [P]    onelayer compare on the main scan, 2 seeds, under the study protocol (P=study) and at own best
#                     rates (P=best); both without P (the two are independent and can run side by side)
#   ensemble [P]      the top-7 specialists' vote vs self-consistency of the best one at k = 7 (the vote reuses the
#                     members' final evaluations; self-consistency samples the best one, trained again alone where
#                     its checkpoint did not come back); P=study (default: members at full training's rate) or best
#                     (each layer at its own best rate)
#   claims            the claims table (CPU is enough)
# SMOKE=1 runs a stage at toy size (2 steps of 2 x 4, 8 held-out problems, 16 new tokens) in its own $W on a CPU,
# with full training's rate fixed (LR, default 1e-5): it checks a stage's wiring before the stage costs GPU time, and
# its numbers mean nothing. E.g. SMOKE=1 bash reproduce.sh main 0,15 && SMOKE=1 bash reproduce.sh strategies
set -eo pipefail
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then W=${W:-/tmp/onelayer-smoke}; LR=${LR:-1e-5}; fi
W=${W:-/root/w}; mkdir -p $W
HERE=$(dirname "$0")
# what earlier sessions brought back (this folder is their $W, evaluations gzipped, no checkpoints)
RESULTS=${RESULTS:-$HERE/../2026-12-02-reproduction-smollm2}
TO=(--task-option min_terms=2 --task-option max_terms=2 --task-option min_digits=1 --task-option max_digits=2
    --task-option 'operators=["+","-"]' --task-option allow_parentheses=false --task-option allow_negation=false
    --task-option eval_size=500)
# the second math task's setting: reasoning-gym's defaults (2-6 terms of 1-4 digits) are too hard for the base model
CHAIN=(--task-option min_terms=2 --task-option max_terms=3 --task-option min_digits=1 --task-option max_digits=1
       --task-option eval_size=500)
# the protocol's sizes: the issue's, or toy ones under SMOKE; CODE_TOKENS: code answers are longer (the code page of
# 2026-11-23 used 192 new tokens, math's 96 would cut them); PASSK_N: problems of the pass@8 check
if [ "$SMOKE" = 1 ]; then
  STEPS=2 PROMPTS=2 GROUP=4 EVERY=2 EVAL_N=8 TOKENS=16 CODE_TOKENS=16 MICRO=8 GEN_BATCH=16 PASSK_N=4
else
  STEPS=100 PROMPTS=16 GROUP=8 EVERY=20 EVAL_N=500 TOKENS=96 CODE_TOKENS=192 MICRO=128 GEN_BATCH=512 PASSK_N=200
fi
PROTOCOL=(--algo grpo --steps $STEPS --prompts-per-step $PROMPTS --group-size $GROUP --eval-every $EVERY
          --no-eval-at-start --eval-n $EVAL_N --max-new-tokens $TOKENS --micro-batch-size $MICRO
          --generation-batch-size $GEN_BATCH --save-every $EVERY --attention eager --keep-optimizer none --no-progress)
# the protocol's evaluation, passed where a command evaluates finished runs again (the ensemble's vote then reuses
# each member's final evaluation)
EVAL=(--n $EVAL_N --max-new-tokens $TOKENS --generation-batch-size $GEN_BATCH --attention eager)
# single-layer runs trained together: 16 in part 1 (its 40 runs in groups of 14, 14, 12); 20 trains ten layers'
# 40 runs in two groups (a joint step's generation is shared by its group, the updates are not)
CONCURRENT=${CONCURRENT:-20}
BEST=${BEST:-3}  # the strategies' rate multiple under the own-best protocol
ol() { python3 -m onelayer "$@"; }

# the sweep's rate with the best mean final accuracy over its seeds (every run must have reached its last step;
# `onelayer train` leaves its evaluations in eval.jsonl, the last row is the final one)
lr() {
  if [ -n "$LR" ]; then echo "$LR"; return; fi
  python3 - "$W/sweep/runs" <<'EOF'
import sys
from collections import defaultdict
from pathlib import Path
from onelayer.jsonl import exists, read_jsonl
runs = sorted(Path(sys.argv[1]).glob("full-lr*-s*"))
final = {r: rows[-1] for r in runs if exists(r / "eval.jsonl") and (rows := read_jsonl(r / "eval.jsonl"))}
done = [r for r in runs if r in final and final[r]["step"] == 100]
if len(runs) < 8 or len(done) < len(runs):
    sys.exit(f"the sweep has not finished ({len(done)} of 8 runs at step 100): run the sweep stage")
by_rate = defaultdict(list)
for r in done:
    by_rate[r.name.split("-s")[0][len("full-lr"):]].append(final[r]["accuracy"])
print(max(sorted(by_rate), key=lambda rate: sum(by_rate[rate]) / len(by_rate[rate])))
EOF
}

case "${1:?stage: restore, sweep, lr, main LAYERS, edge [LAYERS], passk, second LAYERS, code, ood, strategies, ensemble or claims}" in
  restore) cp -rn "$RESULTS"/sweep "$RESULTS"/scans "$RESULTS"/passk-chain-sum "$RESULTS"/compare "$W"/ && ls "$W"/scans/main/runs | wc -l ;;
  sweep) W=$W bash "$HERE/sweep.sh" ;;
  lr) lr ;;
  main)
    ol scan --model smollm2 --task rg:basic_arithmetic "${TO[@]}" "${PROTOCOL[@]}" --layers "${2:?layers, e.g. 0-9}" \
      --lr "$(lr)" --lr-grid 1,3 --seeds 2 --concurrent $CONCURRENT --out $W/scans/main ;;
  edge)
    ol scan --model smollm2 --task rg:basic_arithmetic "${TO[@]}" "${PROTOCOL[@]}" --layers "${2:-0,5,9}" \
      --lr "$(lr)" --lr-grid 10 --seeds 2 --concurrent $CONCURRENT --out $W/scans/main-10x ;;
  passk)
    ol eval --model smollm2 --task rg:chain_sum "${CHAIN[@]}" --samples 8 --temperature 1 --n $PASSK_N --max-new-tokens $TOKENS \
      --out $W/passk-chain-sum-easy ;;
  second)
    ol scan --model smollm2 --task rg:chain_sum "${CHAIN[@]}" "${PROTOCOL[@]}" \
      --layers "${2:?layers, e.g. every:2}" --lr "$(lr)" --lr-grid 1,3 --seeds 1 --concurrent $CONCURRENT --out $W/scans/chain-sum ;;
  code)
    ol scan --model smollm2 --task code:synth --task-option difficulty=2 "${PROTOCOL[@]}" --max-new-tokens $CODE_TOKENS \
      --layers every:3 --lr "$(lr)" --lr-grid 1,3 --seeds 1 --concurrent $CONCURRENT --out $W/scans/code ;;
  ood)
    # out-of-domain evaluation needs the runs' checkpoints, which stay on the machine: a scan of its own (every third
    # layer, one seed, both rates), trained and then evaluated on chain_sum in one session (~11 GPU-min, estimated)
    ol scan --model smollm2 --task rg:basic_arithmetic "${TO[@]}" "${PROTOCOL[@]}" --layers every:3 \
      --lr "$(lr)" --lr-grid 1,3 --seeds 1 --concurrent $CONCURRENT --out $W/scans/ood
    ol analyze ood $W/scans/ood --tasks "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=1&eval_size=500" ;;
  strategies)
    case ${2:-both} in study|best|both) ;; *) echo "strategies: study, best or neither, not $2" >&2; exit 2 ;; esac
    if [ "${2:-study}" = study ]; then
      # the study protocol: every strategy at full training's tuned rate, the layers ranked at that rate; the runs of
      # decoder layers (top:k, middle:10, random:10: 10 of 16) train together, full, lr-guided and LoRA one at a time
      ol compare $W/scans/main --strategies full,top:1,top:3,top:10,lr-guided,middle:10,random:10,lora --seeds 2 \
        --concurrent $CONCURRENT --out $W/compare
    fi
    if [ "${2:-best}" = best ]; then
      # each at its own best rate: the layers ranked by their contribution at theirs, the layer strategies trained at
      # BEST x (every layer's best rate in parts 1-3 was 3x), full training at its own (the profile's full_lr_scale)
      FULL=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["full_lr_scale"])' \
        $W/scans/main/profile-best.json)
      ol compare "$W/scans/main?protocol=best" --seeds 2 --concurrent $CONCURRENT --out $W/compare-best \
        --strategies "full*$FULL,top:1*$BEST,top:3*$BEST,top:10*$BEST,lr-guided*$BEST,middle:10*$BEST,random:10*$BEST"
    fi ;;
  ensemble)
    # the seven layers of highest contribution, as run directories at the rate the protocol reads: full training's
    # (study) or each layer's own best (best)
    P=${2:-study}
    case $P in
      study) PROFILE=profile.json; E=$W/ensemble ;;
      best) PROFILE=profile-best.json; E=$W/ensemble-best ;;
      *) echo "ensemble: study or best, not $P" >&2; exit 2 ;;
    esac
    mapfile -t MEMBERS < <(python3 - "$W/scans/main" $PROFILE <<'EOF'
import json, sys
from pathlib import Path
scan = Path(sys.argv[1])
profile = json.loads((scan / sys.argv[2]).read_text())
points = sorted((p for p in profile["points"] if not p["interpolated"]), key=lambda p: (-p["contribution"], p["layer"]))
for p in points[:7]:
    rate = p.get("lr_scale") or profile["full_lr_scale"]  # the best protocol names each layer's own rate
    tag = "" if rate == 1 else f"-lr{rate:g}x"
    print(scan / "runs" / f"layer{p['layer']:03d}{tag}-s0")
EOF
)
    # self-consistency samples the best member; where its checkpoint did not come back it is trained again alone,
    # with its own layer, rate and seed (the same recipe; alone, bf16 rounding may differ from its group's)
    BEST_RUN=${MEMBERS[0]}
    if [ ! -d "$BEST_RUN/checkpoint" ]; then
      read -r L RATE SEED < <(python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); print(c["layers"], c["lr"], c["seed"])' \
        "$BEST_RUN/config.json")
      ol train --model smollm2 --task rg:basic_arithmetic "${TO[@]}" "${PROTOCOL[@]}" --layers "$L" --lr "$RATE" \
        --seed "$SEED" --out $E-best-member
      BEST_RUN=$E-best-member
    fi
    # the scans' evaluation settings (EVAL), so that the vote reuses each member's final evaluation (no checkpoint needed)
    ol ensemble "${MEMBERS[@]}" "${EVAL[@]}" --out $E
    ol ensemble --self-consistency "$BEST_RUN" --k 7 "${EVAL[@]}" --out $E ;;
  claims)
    ol claims $W/scans/main --math $W/scans/chain-sum --code $W/scans/code --ood $W/scans/ood --compare $W/compare \
      --ensemble $W/ensemble
    ol claims "$W/scans/main?protocol=best" --math $W/scans/chain-sum --code $W/scans/code --ood $W/scans/ood \
      --compare $W/compare-best --ensemble $W/ensemble-best ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
