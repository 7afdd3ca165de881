#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the `slurm` tests (and to try the job scripts by hand), as root:
#
#   bash tools/slurm.sh start    # install Debian's slurm-wlm and munge if missing, configure one node, start the daemons
#   bash tools/slurm.sh stop     # stop them
#   bash tools/slurm.sh status   # sinfo
#
# One node named after this host with all its CPUs and memory, no GPUs (--gres=none), select/cons_tres,
# proctrack/linuxproc (no cgroups needed), accounting in text files. Idempotent: start on a running cluster only waits
# for it. CI runs `start` before the suite (.ci/run) and sets MAME_FAST_REQUIRE_SLURM=1, so the tests never skip.
set -euo pipefail
action=${1:-start}
conf=/etc/slurm/slurm.conf
state=/var/spool/slurmctld

install() {
    if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    fi
}

configure() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    mkdir -p /etc/slurm "$state" /var/spool/slurmd /var/log/slurm /run/munge
    cat > "$conf" <<EOF
ClusterName=mamefast
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
OverTimeLimit=0
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
}

start() {
    install
    configure
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged --force" || munged --force
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|allocated"; then
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm did not come up; logs in /var/log/slurm" >&2
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    return 1
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
}

case "$action" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
