#!/usr/bin/env bash
# Scheduled incremental run: embed every shard of SHARDS (finished shards are skipped, so only new ones
# do work), then add the new embedding shards to the FAISS index (`index --update` builds it on the first
# run). A lock keeps two runs from overlapping: a run that finds the previous one still going exits 0.
#
#   SHARDS   shard spec, as `embedpipe embed` takes it (glob, brace range or @list.txt)   required
#   OUT      embedding folder                                                              required
#   INDEX    index folder (outside OUT)                                   default: $OUT-index
#   CONFIG   whole-job TOML config ([embed], [index] tables)              default: none
#   LOCK     lock file                                                    default: $OUT.cron.lock
#   EMBEDPIPE  the embedpipe executable                                   default: embedpipe on PATH
#
# Exit status: 0 when everything is embedded and indexed (or the previous run is still active);
# 1 when some shards failed (the others are indexed anyway; the next run retries the failed ones);
# 2 for a bad option or input; otherwise the failing command's status.
#
# Example crontab line (every 30 minutes; log appended; % must be escaped in crontab):
#   */30 * * * * SHARDS='/data/shards/*.tar' OUT=/data/emb CONFIG=/opt/embedpipe/jobs/configs/cpu.toml /opt/embedpipe/jobs/cron/embed-incremental.sh >> /var/log/embedpipe-cron.log 2>&1
set -euo pipefail

SHARDS=${SHARDS:?set SHARDS to the shard spec, e.g. SHARDS='/data/shards/*.tar'}
OUT=${OUT:?set OUT to the embedding folder, e.g. OUT=/data/emb}
OUT=${OUT%/}
INDEX=${INDEX:-$OUT-index}
CONFIG=${CONFIG:-}
LOCK=${LOCK:-$OUT.cron.lock}
EMBEDPIPE=${EMBEDPIPE:-embedpipe}

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

mkdir -p "$(dirname "$LOCK")"
exec 9>>"$LOCK"
if ! flock -n 9; then
    echo "$(stamp) previous run still active (lock $LOCK is held); nothing to do"
    exit 0
fi

config=()
if [[ -n $CONFIG ]]; then
    config=(--config "$CONFIG")
fi

echo "$(stamp) embed $SHARDS -> $OUT"
rc=0
"$EMBEDPIPE" ${config[@]+"${config[@]}"} embed "$SHARDS" --out "$OUT" -q || rc=$?
if [[ $rc -ne 0 && $rc -ne 1 ]]; then
    echo "$(stamp) embed failed with exit status $rc; index not updated" >&2
    exit "$rc"
fi
if [[ $rc -eq 1 ]]; then
    echo "$(stamp) some shards failed (listed above); indexing the others, the next run retries them" >&2
fi

echo "$(stamp) index $OUT -> $INDEX (update)"
"$EMBEDPIPE" ${config[@]+"${config[@]}"} index "$OUT" --out "$INDEX" --update
echo "$(stamp) done"
exit "$rc"
