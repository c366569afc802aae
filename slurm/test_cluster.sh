#!/usr/bin/env bash
# A throw-away three-node SLURM cluster on this one machine, for the tests (not for production):
# two-node jobs, with a spare node to take over from a bad one.
#   bash slurm/test_cluster.sh install   # Debian packages (root; about 15 s)
#   bash slurm/test_cluster.sh start     # prints the state folder; export its env file
#   bash slurm/test_cluster.sh stop      # cancels jobs, stops the daemons by their PIDs
# The nodes (node1, node2, node3) run on this host at 127.0.0.1 on their own ports. Everything the
# cluster writes lives under $SLURM_TEST_DIR (default /tmp/denoise-slurm).
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/denoise-slurm}
CONF=$DIR/slurm.conf
NODES=(node1 node2 node3)
CPUS_PER_NODE=${CPUS_PER_NODE:-8}  # declared, not enforced: lets the default #SBATCH lines fit

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    local made_policy=0
    # No systemd here: stop the packages' scripts from trying to start services.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

write_conf() {
    local host; host=$(hostname -s)
    getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
    mkdir -p "$DIR"/{state,log,pid} "${NODES[@]/#/$DIR/spool/}"
    cat > "$CONF" <<EOF
ClusterName=denoise-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pid/slurmctld.pid
SlurmdPidFile=$DIR/pid/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=5
SchedulerParameters=sched_interval=2,bf_interval=1
$(for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17001 + i)) CPUs=$CPUS_PER_NODE State=UNKNOWN"
done)
PartitionName=test Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=UNLIMITED State=UP
EOF
    echo "export SLURM_CONF=$CONF" > "$DIR/env"
}

start_munge() {
    [ -f /etc/munge/munge.key ] || runuser -u munge -- mungekey -c
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # already running
    mkdir -p /run/munge && chown munge: /run/munge
    mkdir -p "$DIR/pid/munge" && chown munge: "$DIR/pid/munge"  # munged writes its pid file as munge
    runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/pid/munge/munged.pid"
    touch "$DIR/pid/munged.started-by-us"  # only a munged we started is ours to stop
    for _ in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "munged did not start" >&2; return 1
}

start() {
    install
    stop_daemons 2>/dev/null || true
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    slurmctld -c -i -f "$CONF"
    for n in "${NODES[@]}"; do slurmd -N "$n" -f "$CONF"; done
    for _ in $(seq 100); do
        if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle')" = "${#NODES[@]}" ]; then
            echo "$DIR"; return 0
        fi
        sleep 0.2
    done
    echo "SLURM nodes did not become idle; see $DIR/log" >&2
    sinfo -N >&2 || true
    return 1
}

_kill_pidfile() {
    local f=$1
    [ -f "$f" ] || return 0
    local pid; pid=$(cat "$f")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop_daemons() {
    for n in "${NODES[@]}"; do _kill_pidfile "$DIR/pid/slurmd-$n.pid"; done
    _kill_pidfile "$DIR/pid/slurmctld.pid"
    if [ -f "$DIR/pid/munged.started-by-us" ]; then
        _kill_pidfile "$DIR/pid/munge/munged.pid"
        rm -f "$DIR/pid/munged.started-by-us"
    fi
}

stop() {
    if [ -f "$CONF" ]; then
        SLURM_CONF=$CONF scancel --full --user="$(id -un)" 2>/dev/null || true
        sleep 1
    fi
    stop_daemons
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
