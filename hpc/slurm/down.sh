#!/usr/bin/env bash
# Stop the local SLURM started by hpc/slurm/up.sh: cancel jobs, stop slurmd, slurmctld, munged.
# Safe to run when nothing is up.
set -uo pipefail
say() { echo "[slurm-down] $*"; }
if command -v scancel >/dev/null 2>&1 && sinfo -h >/dev/null 2>&1; then
  scancel --user="$(id -un)" >/dev/null 2>&1 || true
  for _ in $(seq 20); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
fi
stop_pid() {  # name pidfile
  local pidf="$2" pid
  [ -f "$pidf" ] || return 0
  pid="$(cat "$pidf")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    say "stopped $1 ($pid)"
  fi
  rm -f "$pidf"
}
stop_pid slurmd /run/slurmd.pid
stop_pid slurmctld /run/slurmctld.pid
if [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
  /usr/sbin/munged --stop >/dev/null 2>&1 || kill "$(cat /run/munge/munged.pid)" 2>/dev/null
  say "stopped munged"
fi
exit 0
