#!/usr/bin/env bash
# Submit the whole pipeline to Slurm as a chain: embed (array) -> index -> probe. Prints the job ids.
#
# No job of the chain can wait forever. Index and probe start once every embed task has ended, failed or
# not (--dependency=afterany): the index covers the done shards and its last step exits 1 naming the failed
# ones (rerun embed, then index, to complete it). Steps that need their predecessor's result (index parts
# after train, merge after parts) wait with afterok and --kill-on-invalid-dep=yes: when the predecessor
# fails they are cancelled at once (reason DependencyNeverSatisfied) instead of pending.
#
#   SHARDS='/data/shards/{000000..000999}.tar' OUT=/data/emb TASKS=16 jobs/slurm/submit.sh
#
#   SHARDS       shard spec (expanded by embedpipe, not the shell)                     required
#   OUT          embedding folder                                                      required
#   TASKS        embed array tasks (= parts of the shard list, one GPU each)           default: 8
#   INDEX        index folder (outside OUT)                                        default: $OUT-index
#   INDEX_PARTS  0: one index job; N > 0: train, then an N-task parts array, then merge   default: 0
#   PROBE        probe folder; PROBE=none leaves the probe out (it also skips itself,
#                saying so, when the embeddings have no labels)                        default: $OUT-probe
#   CONFIG       whole-job TOML config               default: this repository's jobs/configs/gpu-default.toml
#   EMBEDPIPE    the embedpipe executable on the nodes                                 default: embedpipe
#   LOGS         folder for the jobs' logs: NAME-JOBID.out, NAME-JOBID_TASK.out for arrays  default: $OUT/logs
# Partition, account, QOS: sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS variables.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SHARDS=${SHARDS:?set SHARDS to the shard spec, e.g. SHARDS='/data/shards/{000000..000999}.tar'}
OUT=${OUT:?set OUT to the embedding folder, e.g. OUT=/data/emb}
export OUT=${OUT%/}
export INDEX=${INDEX:-$OUT-index}
export CONFIG=${CONFIG:-$(dirname "$HERE")/configs/gpu-default.toml}
export EMBEDPIPE=${EMBEDPIPE:-embedpipe}
TASKS=${TASKS:-8}
INDEX_PARTS=${INDEX_PARTS:-0}
PROBE=${PROBE:-$OUT-probe}
LOGS=${LOGS:-$OUT/logs}

if ! [[ $TASKS =~ ^[1-9][0-9]*$ && $INDEX_PARTS =~ ^[0-9]+$ ]]; then
    echo "TASKS ($TASKS) must be a positive integer and INDEX_PARTS ($INDEX_PARTS) 0 or more" >&2
    exit 2
fi
[[ -f $CONFIG ]] || { echo "CONFIG=$CONFIG does not exist" >&2; exit 2; }
mkdir -p "$LOGS"

# submit NAME SCRIPT [SBATCH OPTIONS...] -> prints the job id (sbatch --parsable says "id" or "id;cluster")
submit() {
    local name=$1 script=$2 id log="$LOGS/%x-%j.out"
    shift 2
    [[ " $* " == *" --array="* ]] && log="$LOGS/%x-%A_%a.out"  # %a of a plain job would be 4294967294
    id=$(sbatch --parsable --job-name="embedpipe-$name" --output="$log" "$@" "$script")
    echo "${id%%;*}"
}

embed=$(submit embed "$HERE/embed.sbatch" --array="0-$((TASKS - 1))")
echo "embed:       job $embed ($TASKS array tasks)"
after_embed=(--dependency="afterany:$embed")
if [[ $INDEX_PARTS -eq 0 ]]; then
    index=$(STEP=build submit index "$HERE/index.sbatch" "${after_embed[@]}")
    echo "index:       job $index"
else
    train=$(STEP=train submit index-train "$HERE/index.sbatch" "${after_embed[@]}")
    parts=$(STEP=part submit index-part "$HERE/index.sbatch" --dependency="afterok:$train" \
            --kill-on-invalid-dep=yes --array="0-$((INDEX_PARTS - 1))")
    index=$(STEP=merge submit index-merge "$HERE/index.sbatch" --dependency="afterok:$parts" \
            --kill-on-invalid-dep=yes)
    echo "index:       jobs $train (train), $parts ($INDEX_PARTS parts), $index (merge)"
fi
if [[ $PROBE != none ]]; then
    probe=$(PROBE=$PROBE submit probe "$HERE/probe.sbatch" "${after_embed[@]}")
    echo "probe:       job $probe"
fi
echo "logs:        $LOGS; watch with: squeue -u ${USER:-\$USER}; embedpipe status $OUT"
