#!/usr/bin/env bash
# Runs N jaxlm processes on this machine, joined by jax.distributed on localhost, each with
# its own simulated CPU devices: a multi-host run in miniature, for testing.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local.sh N [--devices-per-process D] [--port P] [--max_restarts R] [--dry-run]
                         -- JAXLM_ARGS...

  N                        number of processes (at least 1)
  --devices-per-process D  simulated CPU devices in each process (default 4)
  --port P                 coordinator port on 127.0.0.1 (default: a free one)
  --max_restarts R         when a process fails, stop them all and start the job again (it
                           resumes from its newest checkpoint), at most R times; not after
                           two failures at the same step (launch/supervise.py)
  --dry-run                print the commands instead of running them
  JAXLM_ARGS               the jaxlm command line, e.g. train --config=configs/gpt_tiny.py --workdir=runs/x

Process 0 is the coordinator and the one writer of metrics; the others prefix their logs with
their id. If any process fails, the others are killed at once (their collectives with it are
broken: no save of theirs could complete) and its exit status is returned. SIGTERM to this
script is passed on to every process: the run saves a checkpoint and stops.
USAGE
}

die() { echo "launch/local.sh: error: $*" >&2; echo "run launch/local.sh --help for usage" >&2; exit 2; }

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
[[ $1 == -h || $1 == --help ]] && { usage; exit 0; }
n=$1; shift
[[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "N must be a positive integer, got '$n'"
devices=4 port='' dry_run=0 max_restarts=''
own_args=("$n")
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    --max_restarts=*) max_restarts=${1#*=}; shift; continue ;;
    --max_restarts) [[ $# -ge 2 ]] || die "--max_restarts needs a value"; max_restarts=$2; shift 2; continue ;;
  esac
  own_args+=("$1")
  case $1 in
    --devices-per-process) [[ $# -ge 2 ]] || die "--devices-per-process needs a value"; devices=$2; own_args+=("$2"); shift 2 ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; port=$2; own_args+=("$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) die "unknown option '$1' (put the jaxlm arguments after --)" ;;
  esac
done
[[ $# -ge 2 && $1 == -- ]] || die "missing '-- JAXLM_ARGS' (for example: -- train --config=FILE --workdir=DIR)"
shift
[[ $devices =~ ^[0-9]+$ && $devices -ge 1 ]] || die "--devices-per-process must be a positive integer"
python=${PYTHON:-python3}
if [[ -n $max_restarts ]]; then
  [[ $max_restarts =~ ^[0-9]+$ ]] || die "--max_restarts must be a non-negative integer, got '$max_restarts'"
  workdir=''
  for ((i = 1; i <= $#; i++)); do
    case ${!i} in
      --workdir=*) workdir=${!i#--workdir=} ;;
      --workdir) j=$((i + 1)); workdir=${!j:-} ;;
    esac
  done
  [[ -n $workdir ]] || die "--max_restarts needs the job's --workdir among JAXLM_ARGS (its progress is read there)"
  supervise=("${SUPERVISOR_PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/supervise.py"
             --max_restarts="$max_restarts" --workdir="$workdir" --name=launch/local.sh --
             bash "${BASH_SOURCE[0]}" "${own_args[@]}" -- "$@")
  if [[ $dry_run == 1 ]]; then printf '%q ' "${supervise[@]}"; echo; fi
  [[ $dry_run == 1 ]] || exec "${supervise[@]}"
  exit 0
fi
if [[ -z $port ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

args=$(printf '%q ' "$@")
commands=()
for ((i = 0; i < n; i++)); do
  commands+=("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$devices JAXLM_COORDINATOR=127.0.0.1:$port JAXLM_NUM_PROCESSES=$n JAXLM_PROCESS_ID=$i $python -m jaxlm ${args% }")
done
if [[ $dry_run == 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done; }
trap 'stop_all KILL' EXIT
trap 'stop_all TERM' INT TERM
for command in "${commands[@]}"; do
  bash -c "exec env $command" &
  pids+=($!)
done
status=0
while [[ ${#pids[@]} -gt 0 ]]; do
  done_pid=''
  if wait -n -p done_pid "${pids[@]}"; then code=0; else code=$?; fi
  [[ -n $done_pid ]] || continue  # A signal (passed on by the trap) interrupted the wait.
  remaining=()
  for pid in "${pids[@]}"; do [[ $pid != "$done_pid" ]] && remaining+=("$pid"); done
  pids=("${remaining[@]+"${remaining[@]}"}")
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    echo "launch/local.sh: a process exited with status $code; stopping the others" >&2
    stop_all KILL
  fi
done
exit $status
