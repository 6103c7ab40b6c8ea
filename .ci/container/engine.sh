#!/usr/bin/env bash
# A throw-away Docker engine for the container tests: `engine.sh start STATE_DIR` runs dockerd
# (vfs storage, so it works inside CI's own container without overlayfs or a kernel module)
# with every file under STATE_DIR and prints the DOCKER_HOST to use; `engine.sh stop STATE_DIR`
# ends that dockerd and removes STATE_DIR. Nothing touches the machine's default engine.
# vfs copies every layer in full: on a tmpfs (when this may mount one) the copies are quick and
# removing a few GB of them at the end is instant, where a disk takes most of a minute.
set -euo pipefail
command_name=${1:?usage: engine.sh start|stop STATE_DIR}
state=${2:?usage: engine.sh start|stop STATE_DIR}
docker_cli=/usr/bin/docker  # Debian's CLI matches its daemon; another docker on PATH may not

start() {
  mkdir -p "$state"
  mount -t tmpfs -o "size=${ENGINE_TMPFS_SIZE:-8g}" tmpfs "$state" 2>/dev/null || true
  mkdir -p "$state/data" "$state/exec"
  local host="unix://$state/docker.sock"
  # Own containerd and exec root under STATE_DIR keep a second engine on the machine untouched.
  dockerd --storage-driver vfs --data-root "$state/data" --exec-root "$state/exec" \
    --pidfile "$state/dockerd.pid" -H "$host" --iptables=false --bridge=none \
    >"$state/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    if "$docker_cli" -H "$host" info >/dev/null 2>&1; then
      echo "$host"
      return 0
    fi
    sleep 1
  done
  echo "dockerd did not start; its log:" >&2
  cat "$state/dockerd.log" >&2
  return 1
}

stop() {
  if [ -f "$state/dockerd.pid" ]; then
    local pid
    pid=$(cat "$state/dockerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
  fi
  if mountpoint -q "$state"; then
    umount --recursive "$state" || umount --lazy "$state"
  fi
  rm -rf "$state"
}

"$command_name"
