#!/usr/bin/env bash
# Stop the single-node cluster that slurm/start-cluster.sh started: cancel its jobs, then stop
# slurmd, slurmctld and munged by the process ids in their pid files.  Touches no other process.
#
#   bash slurm/stop-cluster.sh             # NFT_SLURM_DIR as for start-cluster.sh
set -uo pipefail

STATE="${NFT_SLURM_DIR:-/tmp/nft-slurm}"
export SLURM_CONF="$STATE/slurm.conf"
PATH="$PATH:/usr/sbin:/sbin"

# A pid file names a live daemon of ours only if that process still has the daemon's name.
alive() {  # pidfile name
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# Jobs first, while the controller is still there to end them cleanly.
if alive "$STATE/run/slurmctld.pid" slurmctld && [ -f "$SLURM_CONF" ]; then
    jobs="$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 40); do
            [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
fi

stop_daemon() {  # name pidfile
    local name="$1" pidfile="$2" pid
    alive "$pidfile" "$name" || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        alive "$pidfile" "$name" || break
        sleep 0.25
    done
    if alive "$pidfile" "$name"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "stopped $name ($pid)" >&2
}

stop_daemon slurmd "$STATE/run/slurmd.pid"
stop_daemon slurmctld "$STATE/run/slurmctld.pid"
stop_daemon munged "$STATE/run/munged.pid"
exit 0
