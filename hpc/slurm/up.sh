#!/usr/bin/env bash
# Start a real single-node SLURM on localhost (munged + slurmctld + slurmd, as root, no systemd).
# Idempotent: returns at once when the node already answers. Stop it with hpc/slurm/down.sh.
# Needs Debian's slurm-wlm and munge (hpc/install.sh --slurm).
# Environment: SLURM_CONF_DIR (default /etc/slurm), GLYMPH_SLURM_STATE (default /var/lib/slurm),
#              GLYMPH_SLURM_LOG (default /var/log/slurm), GLYMPH_SLURM_WAIT (seconds, default 60).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
confdir="${SLURM_CONF_DIR:-/etc/slurm}"
state="${GLYMPH_SLURM_STATE:-/var/lib/slurm}"
logdir="${GLYMPH_SLURM_LOG:-/var/log/slurm}"
wait_s="${GLYMPH_SLURM_WAIT:-60}"
say() { echo "[slurm-up] $*"; }
die() { echo "[slurm-up] error: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (the daemons run as root on this single-node setup)"
for c in munged slurmctld slurmd sinfo scontrol; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || die "$c not found: run hpc/install.sh --slurm"
done

if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  say "already up: $(sinfo -h -o '%N %c CPUs %m MB %T')"
  exit 0
fi

cpus="$(nproc --all)"
mem_kb="$(awk '/^MemTotal:/{print $2}' /proc/meminfo)"
mem_mb=$(( mem_kb * 9 / 10 / 1024 ))
conf="$confdir/slurm.conf"
mkdir -p "$confdir" "$state/slurmd" "$state/slurmctld" "$logdir"
if [ -f "$conf" ] && ! grep -q 'glymphmpi local single-node SLURM' "$conf"; then
  die "$conf exists and was not written by glymphmpi: not touching a site configuration"
fi
sed -e "s|@CPUS@|$cpus|" -e "s|@MEM_MB@|$mem_mb|" -e "s|@STATEDIR@|$state|" -e "s|@LOGDIR@|$logdir|" \
  "$here/slurm.conf.in" > "$conf.tmp"
mv "$conf.tmp" "$conf"

# munge
if ! (munge -n 2>/dev/null | unmunge >/dev/null 2>&1); then
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do (munge -n | unmunge >/dev/null 2>&1) && break; sleep 0.1; done
  (munge -n | unmunge >/dev/null 2>&1) || die "munged did not start"
fi

# daemons (stale pids from a previous run are cleared; -c starts with an empty job state)
for d in slurmctld slurmd; do
  pidf="/run/$d.pid"
  if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then continue; fi
  rm -f "$pidf"
  if [ "$d" = slurmctld ]; then /usr/sbin/slurmctld -c; else /usr/sbin/slurmd -N localhost; fi
done

t0=$SECONDS
while :; do
  st="$(sinfo -h -o %T 2>/dev/null | head -1 || true)"
  case "$st" in
    idle|mixed|allocated) break ;;
    down*|drain*|fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
  esac
  if (( SECONDS - t0 > wait_s )); then
    tail -n 5 "$logdir/slurmctld.log" "$logdir/slurmd.log" >&2 || true
    die "node not idle after ${wait_s}s (state '${st}')"
  fi
  sleep 0.5
done
say "up in $((SECONDS - t0)) s: $(sinfo -h -o '%N %c CPUs %m MB %T')"
