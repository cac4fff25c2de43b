#!/usr/bin/env bash
# Runs jaxlm on every worker of a Cloud TPU VM pod slice: creates the slice (or uses one),
# installs this checkout and a pinned jax[tpu] on every worker, and starts the same `jaxlm`
# command on all of them (jax.distributed finds its peers by itself) detached from this SSH
# session: a dropped connection does not stop the run. Each worker logs to ~/jaxlm-logs/jaxlm.log;
# --logs and --attach read them, --stop ends the run (SIGTERM: a checkpoint, then exit).
# --max_restarts=N: each worker runs its process under its own launch/supervise.py, which
# starts it again when it fails (see there how the workers agree).
# --dry-run prints every command instead of running it.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE [options] -- JAXLM_ARGS...

required:
  --name NAME            TPU VM name (also the queued-resource id)
  --zone ZONE            e.g. us-east5-a
  --accelerator TYPE     e.g. v5p-64, v6e-256
options:
  --project PROJECT      gcloud project (default: gcloud's configured one)
  --version RUNTIME      TPU software version (default: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e
                         for v6e, tpu-ubuntu2204-base otherwise)
  --queued               create through queued resources (waits for capacity)
  --spot                 spot capacity
  --use-existing         do not create; the slice NAME exists already
  --mount BUCKET:DIR     mount a GCS bucket with gcsfuse at DIR on every worker (the workdir
                         must be on storage every worker sees, e.g. --workdir=DIR/runs/x)
  --jax-version V        jax[tpu] version to install (default 0.10.2, the one jaxlm is tested
                         with)
  --no-autocheckpoint    do not ask Cloud TPU for a SIGTERM before maintenance (asked by
                         default where offered: v2-v4 and v5e slices, via gcloud alpha)
  --delete               wait for the run to end on every worker, then delete the slice (or
                         alone, without JAXLM_ARGS)
  --logs                 print the last lines of every worker's log, then exit
  --attach               follow worker 0's log (the one process 0 writes), then exit
  --stop                 send the run SIGTERM on every worker: it saves a checkpoint and exits
  --max_restarts N       when a worker's process fails, the others exit within
                         distributed.heartbeat_timeout_s and every worker starts its process
                         again (it resumes from the best checkpoint tier), at most N times; not
                         after two failures at the same step (launch/supervise.py); needs
                         --workdir among JAXLM_ARGS
  --restart_delay S      seconds each worker waits before a restart (default: the
                         --config.distributed.heartbeat_timeout_s among JAXLM_ARGS, else 300,
                         its default): the old run's processes are gone by then
  --dry-run              print the commands, run nothing
  JAXLM_ARGS             e.g. train --config=configs/llama_7b.py --workdir=/mnt/jaxlm/runs/7b

example:
  launch/tpu_pod.sh --name lm --zone us-east5-a --accelerator v5p-64 --queued \
    --mount my-bucket:/mnt/jaxlm -- train --config=configs/llama_7b.py --workdir=/mnt/jaxlm/runs/7b
USAGE
}
die() { echo "launch/tpu_pod.sh: error: $*" >&2; echo "run launch/tpu_pod.sh --help for usage" >&2; exit 2; }

name='' zone='' accelerator='' project='' version='' queued=0 spot=0 existing=0 mount=''
delete=0 dry_run=0 jax_version=0.10.2 autocheckpoint=1 action='' max_restarts='' restart_delay=''
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --name) need "$@"; name=$2; shift 2 ;;
    --zone) need "$@"; zone=$2; shift 2 ;;
    --accelerator) need "$@"; accelerator=$2; shift 2 ;;
    --project) need "$@"; project=$2; shift 2 ;;
    --version) need "$@"; version=$2; shift 2 ;;
    --mount) need "$@"; mount=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --use-existing) existing=1; shift ;;
    --jax-version) need "$@"; jax_version=$2; shift 2 ;;
    --no-autocheckpoint) autocheckpoint=0; shift ;;
    --delete) delete=1; shift ;;
    --logs|--attach|--stop) action=${1#--}; shift ;;
    --max_restarts=*|--restart_delay=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --max_restarts) need "$@"; max_restarts=$2; shift 2 ;;
    --restart_delay) need "$@"; restart_delay=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (put the jaxlm arguments after --)" ;;
  esac
done
[[ $# -gt 0 ]] && shift  # The --.
jaxlm_args=("$@")
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ ${#jaxlm_args[@]} -gt 0 || $delete == 1 || -n $action ]] ||
  die "nothing to do: give -- JAXLM_ARGS, --logs, --attach, --stop and/or --delete"
[[ -z $action || ${#jaxlm_args[@]} -eq 0 ]] || die "--$action takes no JAXLM_ARGS"
[[ -n $accelerator || $existing == 1 || ${#jaxlm_args[@]} -eq 0 ]] ||
  die "--accelerator is required to create a slice (or pass --use-existing)"
[[ -z $mount || $mount == *:/* ]] || die "--mount takes BUCKET:/ABSOLUTE/DIR, got '$mount'"
jaxlm=(python3 -m jaxlm "${jaxlm_args[@]}")
if [[ -n $max_restarts && ${#jaxlm_args[@]} -gt 0 ]]; then
  [[ $max_restarts =~ ^[0-9]+$ ]] || die "--max_restarts must be a non-negative integer, got '$max_restarts'"
  workdir='' heartbeat=300
  for arg in "${jaxlm_args[@]}"; do
    case $arg in
      --workdir=*) workdir=${arg#*=} ;;
      --config.distributed.heartbeat_timeout_s=*) heartbeat=${arg#*=} ;;
    esac
  done
  [[ -n $workdir ]] || die "--max_restarts needs --workdir=DIR among JAXLM_ARGS (its progress is read there)"
  restart_delay=${restart_delay:-$heartbeat}
  [[ $restart_delay =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--restart_delay must be a number of seconds, got '$restart_delay'"
  jaxlm=(python3 launch/supervise.py --max_restarts="$max_restarts" --workdir="$workdir"
         --name=launch/tpu_pod.sh --restart_delay="$restart_delay" -- "${jaxlm[@]}")
fi
if [[ -z $version ]]; then
  case $accelerator in
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

gcloud_flags=(--zone="$zone")
[[ -n $project ]] && gcloud_flags+=(--project="$project")
run() {  # Prints the command; runs it unless --dry-run.
  printf '%q ' "$@"; echo
  [[ $dry_run == 1 ]] || "$@"
}
[[ $dry_run == 1 ]] || command -v gcloud >/dev/null ||
  die "gcloud not found: install the Google Cloud SDK (or use --dry-run)"
on_all_workers() { run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$1"; }
logs='~/jaxlm-logs'  # On each worker: jaxlm.log and jaxlm.pid of the detached run.
# Cloud TPU autocheckpoint (SIGTERM, then up to 5 minutes, before maintenance; jaxlm saves on
# SIGTERM) is offered on v2-v4 and v5e slices, through gcloud alpha.
alpha=() autocheckpoint_flag=()
if [[ $autocheckpoint == 1 && $accelerator =~ ^(v2|v3|v4|v5litepod|v5e)- ]]; then
  alpha=(alpha) autocheckpoint_flag=(--autocheckpoint-enabled)
fi

case $action in
  logs) on_all_workers "hostname; tail -n 20 $logs/jaxlm.log"; exit 0 ;;
  attach) run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=0 \
            --command="tail -n 100 -F $logs/jaxlm.log"; exit 0 ;;
  stop) on_all_workers "kill -TERM -- -\$(cat $logs/jaxlm.pid)"; exit 0 ;;
esac

if [[ ${#jaxlm_args[@]} -gt 0 ]]; then
  if [[ $existing == 0 ]]; then
    spot_flag=(); [[ $spot == 1 ]] && spot_flag=(--spot)
    if [[ $queued == 1 ]]; then
      run gcloud "${alpha[@]}" compute tpus queued-resources create "$name" --node-id="$name" \
        --accelerator-type="$accelerator" --runtime-version="$version" "${gcloud_flags[@]}" \
        "${spot_flag[@]}" "${autocheckpoint_flag[@]}"
      echo "# waiting until the queued resource $name is ACTIVE"
      if [[ $dry_run == 0 ]]; then
        until [[ $(gcloud compute tpus queued-resources describe "$name" "${gcloud_flags[@]}" \
                   --format='value(state.state)') == ACTIVE ]]; do sleep 30; done
      fi
    else
      run gcloud "${alpha[@]}" compute tpus tpu-vm create "$name" --accelerator-type="$accelerator" \
        --version="$version" "${gcloud_flags[@]}" "${spot_flag[@]}" "${autocheckpoint_flag[@]}"
    fi
  fi
  # This checkout, as it is now (uncommitted changes included), on every worker.
  source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  archive=/tmp/jaxlm-$name.tar.gz
  run tar -czf "$archive" -C "$source_dir" --exclude=.git --exclude=runs --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$archive" "$name:/tmp/jaxlm.tar.gz" "${gcloud_flags[@]}" --worker=all
  on_all_workers "mkdir -p ~/jaxlm && tar -xzf /tmp/jaxlm.tar.gz -C ~/jaxlm && pip install -q -e ~/jaxlm 'jax[tpu]==$jax_version'"
  if [[ -n $mount ]]; then
    bucket=${mount%%:*} dir=${mount#*:}
    on_all_workers "sudo mkdir -p $dir && sudo chown \$USER $dir && (mountpoint -q $dir || gcsfuse --implicit-dirs $bucket $dir)"
  fi
  # Every worker runs the same command (under its own supervisor with --max_restarts);
  # JAXLM_DISTRIBUTED=auto joins them through the TPU metadata. setsid + nohup: the run is in
  # a session of its own, which the end of this SSH connection does not signal; its process
  # group id is saved for --stop.
  on_all_workers "mkdir -p $logs && cd ~/jaxlm && JAXLM_DISTRIBUTED=auto setsid nohup $(printf '%q ' "${jaxlm[@]}") > $logs/jaxlm.log 2>&1 < /dev/null & echo \$! > $logs/jaxlm.pid; echo \"\$(hostname): started, logging to $logs/jaxlm.log\""
  echo "# the run goes on without this session: launch/tpu_pod.sh --name $name --zone $zone --logs | --attach | --stop"
fi

if [[ $delete == 1 ]]; then
  if [[ ${#jaxlm_args[@]} -gt 0 ]]; then  # If this connection drops, the slice is kept.
    on_all_workers "while kill -0 \$(cat $logs/jaxlm.pid) 2>/dev/null; do sleep 60; done"
  fi
  if [[ $queued == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$name" "${gcloud_flags[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet
  fi
fi
