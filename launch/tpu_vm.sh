#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice with gcloud: create it, install this checkout on every
# worker, prepare the data, train on all workers at once, follow the logs, fetch the results,
# delete it. Checkpoints, metrics.jsonl and TensorBoard logs go to gs://BUCKET/runs/RUN.
#
#   launch/tpu_vm.sh --name albert --zone us-central2-b --accelerator-type v4-32 \
#       --project my-project --bucket gs://my-bucket              # create install prepare train
#   launch/tpu_vm.sh --name albert --zone us-central2-b --bucket gs://my-bucket logs
#   launch/tpu_vm.sh --name albert --zone us-central2-b --bucket gs://my-bucket fetch delete
#   launch/tpu_vm.sh --dry-run ...        # print every command instead of running it
#   launch/tpu_vm.sh ... -- --config.train.steps=50000 --config.train.batch_size=256
#
# Steps, run in the order given (default: create install prepare train):
#   create   gcloud compute tpus tpu-vm create; with --queued a queued resource instead, and
#            wait until it is ACTIVE (capacity may take hours)
#   install  copy this checkout (git's tracked files as they are now: `git add` new ones) to
#            every worker and pip-install it with jax[tpu] and gcsfs (the gs:// file system)
#   prepare  prepare the data on every worker, into ~/.cache/flax_albert_code/data: the token
#            store is memory-mapped from local disk; every worker builds the same data
#   train    start `python3 -m flax_albert_code.train --config CONFIG --workdir
#            gs://BUCKET/runs/RUN --multihost` on all workers at once (--worker=all), detached,
#            logging to ~/train-RUN.log on each worker
#   logs     follow worker 0's log (Ctrl-C stops following, not training); TensorBoard:
#            tensorboard --logdir gs://BUCKET/runs/RUN/tensorboard
#   status   the VM's state and, per worker, whether training runs and its last log line
#   fetch    copy gs://BUCKET/runs/RUN to runs/RUN and worker 0's prepared data (it holds the
#            tokenizer) to runs/RUN/data; then locally:
#              python -m flax_albert_code.generate --checkpoint runs/RUN "reverse a string"
#              python -m flax_albert_code.evaluate --checkpoint runs/RUN
#   delete   delete the VM (with --queued: the queued resource and its VM)
#   watch    babysit a --spot or --queued run: every --poll seconds, if the VM was preempted
#            (or its queued resource suspended or failed) delete it and run create, install,
#            prepare and train again; stop once training has exited on a READY VM
#
# Preemption and resume: the training command resumes from the latest complete checkpoint in its
# workdir by itself, so after a preemption the same `create install prepare train` continues the
# run (`watch` does exactly that). On preemption the VM gets SIGTERM and the trainer saves a
# checkpoint before exiting; otherwise at most config.train.checkpoint_every steps are redone.
# Spot VMs (--spot) cost less and can be preempted at any time; queued resources (--queued)
# wait for capacity instead of failing, and with --spot ask for spot capacity.
#
# Options:
#   --name NAME               TPU VM (and queued resource) name (required)
#   --zone ZONE               e.g. us-central2-b (required)
#   --accelerator-type TYPE   v4-8 (default), v4-32, v5litepod-16, v5p-8, v6e-8, ...
#   --version VERSION         TPU software version (default tpu-ubuntu2204-base)
#   --project PROJECT         default: gcloud's configured project
#   --bucket gs://BUCKET      where the run directory lives (required by train, fetch, watch)
#   --config FILE             a config of this checkout (default configs/base.py)
#   --run RUN                 run name under gs://BUCKET/runs/ (default: NAME)
#   --spot | --queued         see above; both together: a queued spot resource
#   --poll SECONDS            watch's interval (default 300)
#   --dry-run                 print the commands, run nothing
#   -- ARGS                   config overrides (--config.a.b=v) for prepare and train
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

name="" zone="" accelerator=v4-8 version=tpu-ubuntu2204-base project="" bucket=""
config=configs/base.py run_name="" spot=0 queued=0 poll=300 dry_run=0
overrides=() steps=()
while (($#)); do
  if [[ $1 == --?*=* && $1 != --config.* ]]; then   # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --accelerator-type) accelerator=${2:?--accelerator-type needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --bucket) bucket=${2:?--bucket needs a value}; shift 2 ;;
    --config) config=${2:?--config needs a value}; shift 2 ;;
    --run) run_name=${2:?--run needs a value}; shift 2 ;;
    --poll) poll=${2:?--poll needs a value}; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    -*) die "unknown option $1; see $0 --help." ;;
    *) steps+=("$1"); shift ;;
  esac
done
((${#steps[@]})) || steps=(create install prepare train)
for step in "${steps[@]}"; do
  case "$step" in
    create|install|prepare|train|logs|status|fetch|delete|watch) ;;
    *) die "unknown step '$step'; steps are create install prepare train logs status fetch \
delete watch." ;;
  esac
done
[[ -n $name ]] || die "--name is required (the TPU VM's name)."
[[ -n $zone ]] || die "--zone is required (e.g. us-central2-b)."
[[ $poll =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds, got '$poll'."
run_name=${run_name:-$name}
bucket=${bucket%/}
if [[ -n $bucket && $bucket != gs://* ]]; then
  die "--bucket must be a gs:// URL, got '$bucket'."
fi
workdir=$bucket/runs/$run_name
for step in "${steps[@]}"; do
  case "$step" in
    prepare|train|fetch|watch) [[ -n $bucket ]] \
      || die "step '$step' needs --bucket gs://BUCKET (the run directory's home)." ;;
  esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ $run_name =~ ^[A-Za-z0-9._-]+$ ]] \
  || die "--run (default: --name) must be letters, digits, . _ -, got '$run_name'."
# shellcheck disable=SC2016  # $HOME is expanded on the workers
log='$HOME'/train-$run_name.log
tarball=${TMPDIR:-/tmp}/flax_albert_code-$name.tar.gz


# One shell word per argument, single-quoted only where needed: copy-pasteable dry-run lines
# and safe remote command strings.
quote() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$a "
    else
      out+="'${a//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

run() {
  if ((dry_run)); then quote "$@"; else "$@"; fi
}

gc=(gcloud compute tpus)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
spot_flag=()
((spot == 0)) || spot_flag=(--spot)

ssh_all() { run "${gc[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"; }
ssh_0() { run "${gc[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=0 --command "$1"; }

# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash 3.2 (macOS) too.
config_args=$(quote --config "$config" ${overrides[@]+"${overrides[@]}"})

step_create() {
  if ((queued)); then
    run "${gc[@]}" queued-resources create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" \
      ${spot_flag[@]+"${spot_flag[@]}"}
    if ((dry_run)); then
      quote "${gc[@]}" queued-resources describe "$name" "${where[@]}" --format='value(state.state)'
      return
    fi
    local state
    while :; do
      state=$("${gc[@]}" queued-resources describe "$name" "${where[@]}" \
        --format='value(state.state)')
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) die "queued resource $name is $state; delete it and try again." ;;
      esac
      echo "queued resource $name: $state; waiting for capacity..."
      sleep 60
    done
  else
    run "${gc[@]}" tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$version" ${spot_flag[@]+"${spot_flag[@]}"}
  fi
}

step_install() {
  # Tracked files as they are in the working tree (`git stash create` records them without
  # touching the checkout; it prints nothing when nothing changed, then HEAD is used).
  local archive
  archive="ref=\$(git -C $(quote "$repo") stash create); git -C $(quote "$repo") archive \
--format=tar.gz -o $(quote "$tarball") \"\${ref:-HEAD}\""
  run bash -c "$archive"
  run "${gc[@]}" tpu-vm scp "$tarball" "$name:flax_albert_code.tar.gz" "${where[@]}" --worker=all
  ssh_all "set -e; rm -rf ~/flax_albert_code; mkdir -p ~/flax_albert_code; \
tar -xzf ~/flax_albert_code.tar.gz -C ~/flax_albert_code; cd ~/flax_albert_code; \
python3 -m pip install -q -U pip; python3 -m pip install -q -e \".[gcs]\" \"jax[tpu]>=0.10\""
}

step_prepare() {
  ssh_all "cd ~/flax_albert_code && python3 -m flax_albert_code.prepare $config_args \
--workdir $(quote "$workdir")"
}

step_train() {
  ssh_all "cd ~/flax_albert_code && setsid nohup python3 -m flax_albert_code.train \
$config_args --workdir $(quote "$workdir") --multihost > $log 2>&1 < /dev/null &"
  local flags=(--name "$name" "${where[@]}" --bucket "$bucket" --run "$run_name")
  ((queued == 0)) || flags+=(--queued)
  cat <<EOF
# Training started on every worker of $name into $workdir.
#   follow the log:  launch/tpu_vm.sh $(quote "${flags[@]}") logs
#   TensorBoard:     tensorboard --logdir $workdir/tensorboard
#   fetch results:   launch/tpu_vm.sh $(quote "${flags[@]}") fetch
#   delete the VM:   launch/tpu_vm.sh $(quote "${flags[@]}") delete
EOF
}

step_logs() { ssh_0 "tail -n 100 -F $log"; }

step_status() {
  if ((queued)); then
    run "${gc[@]}" queued-resources describe "$name" "${where[@]}" --format='value(state.state)'
  fi
  run "${gc[@]}" tpu-vm describe "$name" "${where[@]}" --format='value(state)'
  ssh_all "if pgrep -f flax_albert_code.train > /dev/null; then s=training; else s=stopped; fi; \
echo \"\$(hostname): \$s: \$(tail -c 300 $log | tr '\\r' '\\n' | tail -n 1)\""
}

step_fetch() {
  run mkdir -p runs
  run gcloud storage cp -r "$workdir" runs/
  run "${gc[@]}" tpu-vm scp --recurse "$name:.cache/flax_albert_code/data" "runs/$run_name/" \
    "${where[@]}" --worker=0
  echo "# Fetched into runs/$run_name: python -m flax_albert_code.generate --checkpoint runs/$run_name \"...\""
}

step_delete() {
  if ((queued)); then
    run "${gc[@]}" queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run "${gc[@]}" tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

vm_state() {
  if ((queued)); then
    "${gc[@]}" queued-resources describe "$name" "${where[@]}" --format='value(state.state)' \
      2>/dev/null || echo MISSING
  else
    "${gc[@]}" tpu-vm describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null \
      || echo MISSING
  fi
}

recreate() {
  step_delete || true
  step_create
  step_install
  step_prepare
  step_train
}

step_watch() {
  if ((dry_run)); then   # the commands of one round that finds the VM preempted
    echo "# every $poll s: state, then if READY/ACTIVE whether training runs on worker 0:"
    vm_state_cmd=("${gc[@]}" tpu-vm describe "$name" "${where[@]}" --format='value(state)')
    ((queued == 0)) || vm_state_cmd=("${gc[@]}" queued-resources describe "$name" \
      "${where[@]}" --format='value(state.state)')
    quote "${vm_state_cmd[@]}"
    ssh_0 "pgrep -f flax_albert_code.train"
    echo "# if PREEMPTED, TERMINATED, SUSPENDED, FAILED or missing:"
    recreate
    return
  fi
  local state
  while :; do
    state=$(vm_state)
    case "$state" in
      READY|ACTIVE)
        if ! "${gc[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=0 \
            --command="pgrep -f flax_albert_code.train > /dev/null"; then
          echo "Training is not running on $name any more; its last log lines:"
          "${gc[@]}" tpu-vm ssh "$name" "${where[@]}" --worker=0 --command="tail -n 20 $log" \
            || true
          return
        fi
        echo "$(date '+%F %T') $name: $state, training." ;;
      PREEMPTED|TERMINATED|SUSPENDED|FAILED|MISSING)
        echo "$(date '+%F %T') $name: $state; recreating it and resuming the run."
        recreate ;;
      *) echo "$(date '+%F %T') $name: $state; waiting." ;;
    esac
    sleep "$poll"
  done
}

cd "$repo"
for step in "${steps[@]}"; do
  if ((dry_run)); then echo "# $step"; fi
  "step_$step"
done
