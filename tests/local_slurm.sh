#!/bin/bash
# A single-node Slurm on localhost for the tests: `local_slurm.sh start DIR` / `local_slurm.sh stop DIR`.
# Installs Debian's slurm-wlm and munge when missing (needs root and apt), writes a minimal slurm.conf
# under DIR (the node offers one fake GPU, so job scripts that ask for --gpus=1 run), starts munged,
# slurmctld and slurmd, and waits until the node is idle. `stop` ends what `start` started.
set -euo pipefail
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf

stop() {
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
}

if [ "$action" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null || { echo "skip: needs root and apt-get to install slurm-wlm"; exit 2; }
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >"$dir/apt.log" 2>&1 \
        || { echo "skip: could not install slurm-wlm and munge (see $dir/apt.log)"; exit 2; }
fi
[ "$(id -u)" -eq 0 ] || { echo "skip: a local slurmd needs root"; exit 2; }

host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
cat >"$conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=$((17000 + RANDOM % 1000))
SlurmdPort=$((18000 + RANDOM % 1000))
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
KillWait=5
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$host Name=gpu File=/dev/null" >"$dir/gres.conf"  # a fake GPU: the tests train on the CPU

stop
mkdir -p /run/munge  # the default socket, where Slurm's credential plugin looks for it
munged --force --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
SLURM_CONF=$conf slurmctld -f "$conf"
SLURM_CONF=$conf slurmd -f "$conf"
for _ in $(seq 60); do
    if SLURM_CONF=$conf sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "started: SLURM_CONF=$conf"; exit 0; fi
    sleep 1
done
echo "error: the local Slurm did not come up; see $dir/*.log" >&2
stop
exit 1
