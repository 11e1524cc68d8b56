#!/usr/bin/env bash
# Train on GPUs: one GPU, all GPUs of a host, or several hosts (one process per host).
#
#   launch/gpu.sh                                        # all GPUs of this host, configs/base.py
#   launch/gpu.sh --gpus 0                               # one GPU
#   launch/gpu.sh --config configs/large.py -- --config.mesh.data=1 --config.mesh.fsdp=-1
#   # two hosts, the same command on each, only --host-rank differs:
#   launch/gpu.sh --hosts 2 --host-rank 0 --coordinator 10.0.0.1:12345 --workdir /shared/runs/b
#   launch/gpu.sh --hosts 2 --host-rank 1 --coordinator 10.0.0.1:12345 --workdir /shared/runs/b
#   launch/gpu.sh --dry-run ...                          # print the command, run nothing
#
# Arguments after `--` are config overrides (--config.a.b=v) passed to the training command.
#
# One process drives all the GPUs it sees; the mesh (config.mesh, `data: -1` by default) spans
# every GPU of every host. With --hosts N > 1 each host runs one process and the script exports
# what train.py hands to jax.distributed.initialize():
#   JAX_COORDINATOR_ADDRESS  host:port of process 0 (it listens there; pick a free port)
#   JAX_NUM_PROCESSES        N
#   JAX_PROCESS_ID           this host's rank, 0..N-1
# (jax reads JAX_COORDINATOR_ADDRESS itself; train.py reads the other two.) Under Slurm none
# are needed: jax reads SLURM_* itself, see launch/slurm.sbatch.
#
# Each host reads its own rows of every global batch; the prepared data must be identical on all
# hosts: keep the workdir (or --config.data.data_dir) on a shared filesystem, or prepare the same
# sources on every host (the preparation is deterministic). Checkpoints are written by all
# processes into the workdir, so it must be shared (NFS, or a gs:// bucket with `pip install
# -e .[gcs]`). Running the same command again resumes from the latest checkpoint.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

config=configs/base.py
workdir=""
gpus=all
hosts=1
host_rank=""
coordinator=""
dry_run=0
python=${PYTHON:-python3}
overrides=()

while (($#)); do
  case "$1" in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a directory}; shift 2 ;;
    --gpus) gpus=${2:?--gpus needs all or a list like 0,1}; shift 2 ;;
    --hosts) hosts=${2:?--hosts needs a number}; shift 2 ;;
    --host-rank) host_rank=${2:?--host-rank needs a number}; shift 2 ;;
    --coordinator) coordinator=${2:?--coordinator needs host:port}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) die "unknown argument $1; see $0 --help." ;;
  esac
done

[[ $hosts =~ ^[1-9][0-9]*$ ]] || die "--hosts must be a positive number, got '$hosts'."
[[ $gpus == all || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--gpus must be 'all' or a list like 0,1, got '$gpus'."
if [[ -z $workdir ]]; then
  name=$(basename "$config" .py)
  workdir=runs/$name
fi

env_vars=()
[[ $gpus == all ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
multihost=()
if ((hosts > 1)); then
  [[ -n $coordinator ]] || die "--hosts $hosts needs --coordinator HOST:PORT (host 0's address)."
  [[ $coordinator == *:* ]] || die "--coordinator must be HOST:PORT, got '$coordinator'."
  if ! [[ $host_rank =~ ^[0-9]+$ ]] || ((host_rank >= hosts)); then
    die "--host-rank must be 0..$((hosts - 1)), got '$host_rank'."
  fi
  env_vars+=("JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=$hosts"
             "JAX_PROCESS_ID=$host_rank")
  multihost=(--multihost)
fi

# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash 3.2 (macOS) too.
cmd=("$python" -m flax_albert_code.train --config "$config" --workdir "$workdir"
     ${multihost[@]+"${multihost[@]}"} ${overrides[@]+"${overrides[@]}"})
if ((${#env_vars[@]})); then
  cmd=(env "${env_vars[@]}" "${cmd[@]}")
fi
if ((dry_run)); then
  printf -v line '%q ' "${cmd[@]}"
  echo "${line% }"
  exit 0
fi
exec "${cmd[@]}"
