#!/usr/bin/env bash
# Create, set up, train on, watch, stop and delete a Cloud TPU VM or pod slice with gcloud.
# Every worker of the slice runs the same `python -m cotir_jax.train --distributed ...`;
# `./run_tpu.sh --help` documents commands, options and environment variables.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./run_tpu.sh [OPTIONS] COMMAND [ARGS...]

Drives one Cloud TPU slice (a queued resource and its TPU, both named TPU_NAME) with gcloud.
Options go before COMMAND; what follows COMMAND belongs to it.

Commands:
  create [GCLOUD_ARGS...]  request the slice: gcloud compute tpus queued-resources create
                           (extra arguments go to gcloud, e.g. --service-account=SA).
                           It is ready when `status` shows state ACTIVE.
  status                   describe the queued resource, with its state (WAITING_FOR_RESOURCES,
                           PROVISIONING, ACTIVE, SUSPENDED, FAILED, ...).
  setup                    copy this checkout (files git tracks or would track) to every
                           worker, install it with `pip install -e ".[tpu]"` into a Python 3.11
                           venv there (made with uv), and with --bucket mount the bucket on
                           every worker with Cloud Storage FUSE. Refuses while a trainer runs.
  train TRAINER_ARGS...    start `python -m cotir_jax.train --distributed TRAINER_ARGS` on every
                           worker, detached (setsid nohup: it survives the ssh session), output
                           appended to the worker's own log. TRAINER_ARGS must hold --config
                           and --workdir DIR with an absolute DIR that all workers share (a
                           multi-host checkpoint is written by every worker into one directory;
                           metrics and images are written by process 0). --config.a.b=v
                           overrides pass through unchanged. Re-running train after stop (or
                           on a new slice, of this size or another) resumes from the newest
                           checkpoint in DIR; the compile cache in DIR/compile_cache serves
                           every worker, so a re-run on this slice compiles nothing.
  tail [WORKER]            follow the log of worker WORKER (default 0); Ctrl-C stops following,
                           not training.
  stop                     send SIGTERM to the trainer on every worker: it saves a checkpoint
                           at the current step and exits; waits up to STOP_TIMEOUT seconds.
  exec COMMAND...          run a bash command on every worker, in its home directory, with
                           $dir, $venv and $log naming the checkout, venv and trainer log.
  delete                   delete the queued resource and its TPU (gcloud asks to confirm).
                           Run stop first: files on the workers' disks are lost.

Options (each also read from the environment variable named after it):
  --name NAME              TPU_NAME          queued resource and TPU name (required)
  --zone ZONE              ZONE              e.g. us-west4-a (required)
  --project PROJECT        PROJECT           default: gcloud's configured project
  --accelerator-type TYPE  ACCELERATOR_TYPE  create: v5litepod-16 (v5e), v5p-8, v6e-8, ...
  --runtime-version V      RUNTIME_VERSION   create: TPU software version; default by
                                             generation: v5e v2-alpha-tpuv5-lite,
                                             v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e,
                                             v4 and older tpu-ubuntu2204-base
  --provisioning MODE      PROVISIONING      create: spot (default; preemptible), reserved
                                             (your reservation) or on-demand
  --remote-dir DIR         REMOTE_DIR        checkout on each worker, relative to its home
                                             (default cotir_jax); beside it DIR_venv (the
                                             venv), DIR_train.log and DIR_train.pid
  --bucket BUCKET          BUCKET            setup: mount gs://BUCKET on every worker
  --mount DIR              MOUNT             setup: where to mount it (default /gcs)
  --stop-timeout SECONDS   STOP_TIMEOUT      stop: how long to wait (default 900)
  --dry-run                DRY_RUN=1         print every gcloud command instead of running it
  -h, --help                                 this text

Example (v5e-16, 9B; see README.md "Training on a TPU pod slice"):
  export TPU_NAME=cotir-9b ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 BUCKET=my-bucket
  ./run_tpu.sh create && ./run_tpu.sh status     # wait for state ACTIVE
  ./run_tpu.sh setup
  ./run_tpu.sh train --config configs/cotir_9b.py --workdir /gcs/runs/cotir-9b \
      --config.model.pretrained=/gcs/flux2-klein-9b-orbax --config.data.data_dir=/gcs/CoTIR-Bench
  ./run_tpu.sh tail
  ./run_tpu.sh stop && ./run_tpu.sh delete
EOF
}

die() {
  echo "run_tpu.sh: error: $*" >&2
  exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REMOTE_TARBALL=cotir_jax_src.tar.gz  # in each worker's home during setup
PYTHON_VERSION=3.11                  # pyproject.toml: requires-python >= 3.11

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROVISIONING=${PROVISIONING:-spot}
REMOTE_DIR=${REMOTE_DIR:-cotir_jax}
BUCKET=${BUCKET:-}
MOUNT=${MOUNT:-/gcs}
STOP_TIMEOUT=${STOP_TIMEOUT:-900}
DRY_RUN=${DRY_RUN:-0}

set_option() {
  case $1 in
    --name) TPU_NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --provisioning) PROVISIONING=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --bucket) BUCKET=$2 ;;
    --mount) MOUNT=$2 ;;
    --stop-timeout) STOP_TIMEOUT=$2 ;;
    *) die "unknown option $1 (see ./run_tpu.sh --help)" ;;
  esac
}

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --*=*) set_option "${1%%=*}" "${1#*=}"; shift ;;
    --*) (($# >= 2)) || die "$1 needs a value"; set_option "$1" "$2"; shift 2 ;;
    -*) die "unknown option $1 (see ./run_tpu.sh --help)" ;;
    *) break ;;
  esac
done
(($#)) || { usage >&2; die "missing COMMAND"; }
COMMAND=$1
shift

require() {  # VARIABLE option: dies when the setting is empty
  [[ -n ${!1} ]] || die "$COMMAND needs $1: export $1=... or pass $2 ... before the command"
}

quote() {  # VAR WORD: sets VAR to WORD as one shell word (single-quoted unless plain)
  if [[ $2 =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then
    printf -v "$1" '%s' "$2"
  else
    printf -v "$1" "'%s'" "${2//\'/\'\\\'\'}"
  fi
}

gcloud_run() {
  if [[ $DRY_RUN == 1 ]]; then
    local line=gcloud word quoted
    for word in "$@"; do
      quote quoted "$word"
      line+=" $quoted"
    done
    echo "$line"
  else
    gcloud "$@"
  fi
}

# Shell code every worker command starts with: where things live on a worker, and whether the
# trainer recorded in the pid file is alive (a zombie is not).
read -r -d '' WORKER_PRELUDE <<'EOF' || true
set -euo pipefail
cd
[[ $dir == /* ]] || dir=$HOME/$dir
venv=${dir}_venv log=${dir}_train.log pidfile=${dir}_train.pid
running() {
  [[ -f $pidfile ]] && pid=$(<"$pidfile") && kill -0 "$pid" 2>/dev/null &&
    [[ $(ps -o stat= -p "$pid") != Z* ]]
}
EOF

on_workers() {  # WORKER SCRIPT [NAME=VALUE...]: runs SCRIPT there after the prelude, with
  # each NAME set to VALUE (shell-quoted); WORKER is a number or "all".
  local worker=$1 body=$2 assignments='' assignment value script
  shift 2
  for assignment in "dir=${REMOTE_DIR%/}" "$@"; do
    quote value "${assignment#*=}"
    assignments+="${assignment%%=*}=$value"$'\n'
  done
  quote script "$assignments$WORKER_PRELUDE"$'\n'"$body"
  gcloud_run compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$worker" \
    --command="bash -c $script"
}

default_runtime() {  # ACCELERATOR_TYPE → the TPU software version Google lists for JAX
  case $1 in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

cmd_create() {
  require ACCELERATOR_TYPE --accelerator-type
  case $ACCELERATOR_TYPE in
    v5e-*) die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE: v5e slices are called v5litepod-N" \
      "(e.g. v5litepod-16)" ;;
  esac
  local runtime=$RUNTIME_VERSION
  if [[ -z $runtime ]]; then
    runtime=$(default_runtime "$ACCELERATOR_TYPE") ||
      die "no default runtime version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE:" \
        "set RUNTIME_VERSION or --runtime-version"
  fi
  local provisioning
  case $PROVISIONING in
    spot) provisioning=(--spot) ;;
    reserved) provisioning=(--reserved) ;;
    on-demand) provisioning=() ;;
    *) die "PROVISIONING=$PROVISIONING: expected spot, reserved or on-demand" ;;
  esac
  gcloud_run compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$runtime" "${provisioning[@]}" "$@"
  [[ $DRY_RUN == 1 ]] || echo "run_tpu.sh: requested $ACCELERATOR_TYPE ($PROVISIONING," \
    "$runtime) as $TPU_NAME; it is ready when ./run_tpu.sh status shows state ACTIVE" >&2
}

cmd_status() {
  gcloud_run compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}"
}

read -r -d '' MOUNT_SCRIPT <<'EOF' || true
if ! command -v gcsfuse >/dev/null; then
  repo="https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] $repo" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
if ! mountpoint -q "$mount"; then
  sudo mkdir -p "$mount" && sudo chown "$(id -u):$(id -g)" "$mount"
  gcsfuse --implicit-dirs --rename-dir-limit=1000000 "$bucket" "$mount"
fi
echo "$(hostname): gs://$bucket mounted at $mount"
EOF

read -r -d '' INSTALL_SCRIPT <<'EOF' || true
if running; then
  echo "$(hostname): a trainer is running (pid $pid); run stop before setup" >&2
  exit 1
fi
rm -rf "$dir" && mkdir -p "$dir" && tar -xzf "$tarball" -C "$dir" && rm "$tarball"
[[ -x ~/.local/bin/uv ]] || curl -LsSf https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh
~/.local/bin/uv venv --allow-existing --python "$python_version" "$venv"
~/.local/bin/uv pip install --python "$venv/bin/python" -e "${dir}[tpu]"
echo "$(hostname): installed $dir into $venv"
EOF

cmd_setup() {
  local files
  files=$(cd "$ROOT" && git ls-files -co --exclude-standard | wc -l) ||
    die "setup copies the files of a git checkout; $ROOT is not one"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# pack the $((files)) files of the checkout $ROOT into TARBALL"
    TARBALL=TARBALL
  else
    TARBALL=$(mktemp "${TMPDIR:-/tmp}/cotir_jax_src.XXXXXX")
    trap 'rm -f "$TARBALL"' EXIT
    (
      cd "$ROOT"
      git ls-files -z -co --exclude-standard |
        while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
        tar --null -T - -czf "$TARBALL"
    )
  fi
  gcloud_run compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" --worker=all \
    "${WHERE[@]}"
  if [[ -n $BUCKET ]]; then
    on_workers all "$MOUNT_SCRIPT" "bucket=${BUCKET#gs://}" "mount=$MOUNT"
  fi
  on_workers all "$INSTALL_SCRIPT" "tarball=$REMOTE_TARBALL" "python_version=$PYTHON_VERSION"
}

read -r -d '' TRAIN_SCRIPT <<'EOF' || true
if running; then
  echo "$(hostname): a trainer is already running (pid $pid); run stop first" >&2
  exit 1
fi
[[ -x $venv/bin/python ]] || { echo "$(hostname): $venv is missing: run setup first" >&2; exit 1; }
cd "$dir"
echo "=== $(date -u +%FT%TZ) python -m cotir_jax.train --distributed ${args[*]}" >>"$log"
PYTHONUNBUFFERED=1 setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" \
  "$venv/bin/python" -m cotir_jax.train --distributed "${args[@]}" >>"$log" 2>&1 </dev/null &
echo "$(hostname): trainer started; log: $log"
EOF

cmd_train() {
  local workdir='' i next
  for ((i = 1; i <= $#; i++)); do
    case ${!i} in
      --workdir=*) workdir=${!i#--workdir=} ;;
      --workdir) next=$((i + 1)); workdir=${!next:-} ;;
    esac
  done
  [[ $workdir == /* ]] ||
    die "train needs --workdir DIR with an absolute DIR that every worker shares, e.g." \
      "$MOUNT/runs/NAME on the bucket that setup --bucket mounts (got '$workdir')"
  local args='' arg quoted
  for arg in "$@"; do
    quote quoted "$arg"
    args+=" $quoted"
  done
  on_workers all "args=(${args# })"$'\n'"$TRAIN_SCRIPT"
}

read -r -d '' STOP_SCRIPT <<'EOF' || true
if ! running; then
  echo "$(hostname): no trainer running"
  exit 0
fi
kill -TERM "$pid"
echo "$(hostname): sent SIGTERM to trainer $pid; waiting up to ${timeout}s for its checkpoint"
SECONDS=0
while running; do
  if ((SECONDS >= timeout)); then
    echo "$(hostname): trainer $pid is still running after ${timeout}s" >&2
    exit 1
  fi
  sleep 0.5
done
echo "$(hostname): trainer exited; the log ends with:"
tail -n 3 "$log"
EOF

cmd_stop() {
  [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT=$STOP_TIMEOUT: expected a number of seconds"
  on_workers all "$STOP_SCRIPT" "timeout=$STOP_TIMEOUT"
}

cmd_tail() {
  local worker=${1:-0}
  [[ $worker =~ ^[0-9]+$ ]] || die "tail WORKER: expected a worker number (0, 1, ...)," \
    "got '$worker'"
  # shellcheck disable=SC2016  # $log is the worker's
  on_workers "$worker" 'tail -n 100 -F "$log"'
}

cmd_exec() {
  (($#)) || die "exec needs a command to run on every worker"
  on_workers all "$*"
}

cmd_delete() {
  gcloud_run compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force
}

case $COMMAND in
  create | status | setup | train | tail | stop | exec | delete) ;;
  help) usage; exit 0 ;;
  *) die "unknown command '$COMMAND' (see ./run_tpu.sh --help)" ;;
esac
require TPU_NAME --name
require ZONE --zone
WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")
"cmd_$COMMAND" "$@"
