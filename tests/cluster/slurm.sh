#!/usr/bin/env bash
# A single-node SLURM on 127.0.0.1 for the tests (tests/test_slurm.py), from Debian's packages.
#
#   tests/cluster/slurm.sh install   apt-get the packages (root; Debian 12: SLURM 22.05)
#   tests/cluster/slurm.sh start     munged, slurmctld, slurmd; idempotent
#   tests/cluster/slurm.sh stop      the same daemons, stopped by their pidfiles, in reverse order
#   tests/cluster/slurm.sh status    which of them run (exit 1 if any does not)
#
# The node: this machine's CPUs and memory, partition `debug`, two fake GPUs as gres (`--gpus=1`
# gives the job CUDA_VISIBLE_DEVICES). No accounting daemon: the profile reads job states with
# `squeue` (workflow/profiles/slurm/config.yaml says why), which needs MinJobAge >= 3 x the plugin's
# first status check (SLURM's default 300 s is kept). No systemd: every daemon is started here and
# writes a pidfile; `stop` kills only those PIDs. It writes /etc/slurm/slurm.conf and gres.conf,
# and refuses to overwrite files it did not write.
set -euo pipefail

MARK="# written by tests/cluster/slurm.sh (phase11 tests)"
PACKAGES=(munge slurm-client slurmctld slurmd)
NODE=$(hostname -s)
CLUSTER=phase11
ETC=/etc/slurm
RUN=/run/slurm
LOG=/var/log/slurm
# daemon name -> pidfile (the order in which they start; stop goes backwards)
DAEMONS=(munged slurmctld slurmd)
declare -A PIDFILE=([munged]=/run/munge/munged.pid [slurmctld]=$RUN/slurmctld.pid [slurmd]=$RUN/slurmd.pid)

say() { echo "slurm.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# pid of a running daemon (from its pidfile, checked against /proc/PID/comm), or nothing
pid_of() {
    local f=${PIDFILE[$1]} pid
    [[ -s $f ]] || return 0
    pid=$(tr -dc 0-9 < "$f")
    [[ -n $pid && -r /proc/$pid/comm && $(cat /proc/$pid/comm) == "$1"* ]] && echo "$pid"
    return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for $what"
        sleep 0.3
    done
}

write_conf() {  # write_conf FILE (content on stdin); never clobbers a file this script did not write
    local f=$1 tmp
    if [[ -e $f ]] && ! grep -qF "$MARK" "$f"; then
        die "$f exists and was not written by this script: not touching a real SLURM setup"
    fi
    tmp=$(mktemp "$f.XXXXXX")
    { echo "$MARK"; cat; } > "$tmp"
    chmod 0644 "$tmp"
    if [[ -e $f ]] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$f"
        CHANGED+=" $f"
    fi
}

cmd_install() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || { say "packages present"; return 0; }
    [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

configure() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
    install -d -o slurm -g slurm -m 0755 /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOG" "$RUN"
    write_conf "$ETC/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups here: processes are tracked by parentage, tasks are not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# how long squeue still shows a finished job (SLURM's default; the plugin needs >= 3 x 40 s)
MinJobAge=300
MailProg=/bin/true
InactiveLimit=0
# seconds between SIGTERM and SIGKILL when a job is cancelled or preempted (real clusters: 30)
KillWait=30
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    # slurmd 22.05 drops GPU gres without device files: two clones of /dev/null stand in
    for i in 0 1; do
        [[ -e /dev/fakegpu$i ]] || mknod -m 666 /dev/fakegpu$i c 1 3
    done
    write_conf "$ETC/gres.conf" <<EOF
NodeName=$NODE Name=gpu File=/dev/fakegpu[0-1]
EOF
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "starting the daemons needs root"
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || die "package $p missing: run '$0 install' first"
    done
    local d
    CHANGED=""
    configure
    if [[ $CHANGED == *slurm.conf* || $CHANGED == *gres.conf* ]]; then
        for d in slurmd slurmctld; do     # a running cluster picks up the new configuration
            [[ -z $(pid_of $d) ]] || { say "configuration changed: restarting $d"; stop_one $d; }
        done
    fi

    if [[ -z $(pid_of munged) ]]; then
        [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
        install -d -o munge -g munge -m 0755 /run/munge
        install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 munged bash -c 'munge -n | unmunge'
    fi

    [[ -n $(pid_of slurmctld) ]] || /usr/sbin/slurmctld
    [[ -n $(pid_of slurmd) ]] || /usr/sbin/slurmd
    wait_for 60 "node $NODE idle" bash -c "sinfo -h -n '$NODE' -o '%T' | grep -qE '^(idle|mixed|allocated)'"
    say "up: $(sinfo -h -o '%P %D %T %G' | head -1); $(status_line)"
}

status_line() {
    local d out=""
    for d in "${DAEMONS[@]}"; do out+="$d=$(pid_of "$d") "; done
    echo "${out% }"
}

cmd_status() {
    local d ok=0
    echo "$(status_line)"
    for d in "${DAEMONS[@]}"; do [[ -n $(pid_of "$d") ]] || ok=1; done
    return $ok
}

stop_one() {
    local d=$1 pid deadline
    pid=$(pid_of "$d")
    [[ -n $pid ]] || return 0
    kill -TERM "$pid"
    deadline=$((SECONDS + 30))
    while [[ -e /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.2; done
    if [[ -e /proc/$pid ]]; then
        say "$d ($pid) ignored SIGTERM for 30 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    say "stopped $d ($pid)"
}

cmd_stop() {
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${DAEMONS[i]}"; done
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
