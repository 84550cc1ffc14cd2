#!/usr/bin/env bash
# Run the pipeline on Kubernetes in order: the embed Indexed Job, then, once it has ended, the index and
# probe Jobs. Kubernetes has no dependencies between Jobs, so this script waits for the embed Job's
# Complete or Failed condition (like Slurm's afterany: a failed index of the embed Job must not stall the
# rest) and then starts the others; the index Job covers the done shards and fails naming the missing ones.
# Run it where it can stay up for the whole embedding (a login node, a CI runner, a pod whose service
# account may get, create and delete Jobs).
#
#   kubectl apply -f jobs/k8s/pvc.yaml            # once
#   jobs/k8s/submit.sh
#
#   KUBECTL   the kubectl command, e.g. "kubectl -n embedding --context gpu-cluster"  default: kubectl
#   PROBE     none leaves the probe Job out                                             default: run it
#   POLL      seconds between checks of the embed Job                                   default: 60
# Edit the manifests beside this script for shards, sizes and images. A finished embed Job is kept for
# a day (ttlSecondsAfterFinished); to embed again, delete it first: kubectl delete job embedpipe-embed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KUBECTL=${KUBECTL:-kubectl}
PROBE=${PROBE:-}
POLL=${POLL:-60}
[[ $POLL =~ ^[0-9]+$ ]] || { echo "POLL ($POLL) must be a number of seconds" >&2; exit 2; }

stamp() { date -u +%FT%TZ; }

# shellcheck disable=SC2086  # KUBECTL may be a command with arguments
$KUBECTL apply -f "$HERE/embed-indexed-job.yaml"
echo "$(stamp) waiting for job/embedpipe-embed to complete or fail"
while :; do
    # shellcheck disable=SC2086
    ended=$($KUBECTL get job embedpipe-embed \
            -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')
    case " $ended " in
        *" Complete "*|*" Failed "*) break ;;
    esac
    sleep "$POLL"
done
echo "$(stamp) job/embedpipe-embed ended: $ended"

# Jobs run once: replace the index and probe Jobs of an earlier run, so that they see these embeddings.
steps=(index)
[[ $PROBE == none ]] || steps+=(probe)
for step in "${steps[@]}"; do
    # shellcheck disable=SC2086
    $KUBECTL delete job "embedpipe-$step" --ignore-not-found
    # shellcheck disable=SC2086
    $KUBECTL apply -f "$HERE/$step-job.yaml"
done
echo "$(stamp) started: ${steps[*]/#/job/embedpipe-}; follow with: $KUBECTL logs -f job/embedpipe-index"
if [[ $ended == *Failed* ]]; then
    echo "$(stamp) the embed Job failed: the index will hold the done shards only" >&2
    exit 1
fi
