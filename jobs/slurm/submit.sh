#!/usr/bin/env bash
# Submit the whole pipeline to Slurm as a chain: embed (array) -> index -> probe, each step starting
# only when the previous one succeeded (--dependency=afterok). Prints the job ids.
#
#   SHARDS='/data/shards/{000000..000999}.tar' OUT=/data/emb TASKS=16 jobs/slurm/submit.sh
#
#   SHARDS       shard spec (expanded by embedpipe, not the shell)                     required
#   OUT          embedding folder                                                      required
#   TASKS        embed array tasks (= parts of the shard list, one GPU each)           default: 8
#   INDEX        index folder                                                          default: $OUT/index
#   INDEX_PARTS  0: one index job; N > 0: train, then an N-task parts array, then merge   default: 0
#   PROBE        probe folder; PROBE=none skips the probe (collections without labels) default: $OUT/probe
#   CONFIG       whole-job TOML config                        default: jobs/configs/gpu-default.toml
#   EMBEDPIPE    the embedpipe executable on the nodes                                 default: embedpipe
#   LOGS         folder for the jobs' logs                                             default: $OUT/logs
# Partition, account, QOS: sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS variables.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SHARDS=${SHARDS:?set SHARDS to the shard spec, e.g. SHARDS='/data/shards/{000000..000999}.tar'}
OUT=${OUT:?set OUT to the embedding folder, e.g. OUT=/data/emb}
export OUT=${OUT%/}
export INDEX=${INDEX:-$OUT/index}
export CONFIG=${CONFIG:-$HERE/../configs/gpu-default.toml}
export EMBEDPIPE=${EMBEDPIPE:-embedpipe}
TASKS=${TASKS:-8}
INDEX_PARTS=${INDEX_PARTS:-0}
PROBE=${PROBE:-$OUT/probe}
LOGS=${LOGS:-$OUT/logs}

if ! [[ $TASKS =~ ^[1-9][0-9]*$ && $INDEX_PARTS =~ ^[0-9]+$ ]]; then
    echo "TASKS ($TASKS) must be a positive integer and INDEX_PARTS ($INDEX_PARTS) 0 or more" >&2
    exit 2
fi
[[ -f $CONFIG ]] || { echo "CONFIG=$CONFIG does not exist" >&2; exit 2; }
mkdir -p "$LOGS"

# submit NAME SCRIPT [SBATCH OPTIONS...] -> prints the job id (sbatch --parsable says "id" or "id;cluster")
submit() {
    local name=$1 script=$2 id
    shift 2
    id=$(sbatch --parsable --job-name="embedpipe-$name" --output="$LOGS/%x-%A_%a.out" "$@" "$script")
    echo "${id%%;*}"
}

embed=$(submit embed "$HERE/embed.sbatch" --array="0-$((TASKS - 1))")
echo "embed:       job $embed ($TASKS array tasks)"
if [[ $INDEX_PARTS -eq 0 ]]; then
    index=$(STEP=build submit index "$HERE/index.sbatch" --dependency="afterok:$embed")
    echo "index:       job $index"
else
    train=$(STEP=train submit index-train "$HERE/index.sbatch" --dependency="afterok:$embed")
    parts=$(STEP=part submit index-part "$HERE/index.sbatch" --dependency="afterok:$train" \
            --array="0-$((INDEX_PARTS - 1))")
    index=$(STEP=merge submit index-merge "$HERE/index.sbatch" --dependency="afterok:$parts")
    echo "index:       jobs $train (train), $parts ($INDEX_PARTS parts), $index (merge)"
fi
if [[ $PROBE != none ]]; then
    probe=$(PROBE=$PROBE submit probe "$HERE/probe.sbatch" --dependency="afterok:$embed")
    echo "probe:       job $probe"
fi
echo "logs:        $LOGS; watch with: squeue -u ${USER:-\$USER}; embedpipe status $OUT"
