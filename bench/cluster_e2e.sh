#!/usr/bin/env bash
# The whole cluster path on one machine: `ray up` (local provider, over SSH to 127.0.0.1 and
# 127.0.0.2), `ray submit jobs/pipeline.py`, check the result, `ray down`.
#
#   sudo apt-get install -y openssh-server rsync      # once
#   bash bench/cluster_e2e.sh                         # as root, from a checkout with .venv
#
# What it sets up, and removes again on exit (all of it under one work dir in /tmp):
# - a login `rayflow-e2e` (uid 0, so that it can use this checkout's venv; its home is in the
#   work dir) whose shell puts the venv on its PATH behind a `ray` shim: the shim's `stop`
#   (which `ray down` runs on each node) stops only this cluster's processes, where a real
#   `ray stop` would end every Ray process on the machine;
# - an sshd on 127.0.0.1:22 and 127.0.0.2:22 only, key-only, with its own config and host key;
# - Ray token auth, as Ray 2.60 defaults to, with one token file shared by the nodes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
WORK=$(mktemp -d /tmp/rayflow-e2e.XXXXXX)
LOGIN=rayflow-e2e
EVENTS=${EVENTS:-2000000}
HOMEDIR="$WORK/home"
chmod 755 "$WORK"
mkdir -p "$HOMEDIR/.ssh" "$WORK/bin" "$WORK/run"
chmod 700 "$HOMEDIR/.ssh"

cleanup() {
  set +e
  if [ -f "$WORK/cluster.yaml" ]; then
    (cd "$ROOT" && timeout 180 "$VENV/bin/ray" down -y "$WORK/cluster.yaml" >"$WORK/down.log" 2>&1)
  fi
  "$WORK/bin/ray" stop >/dev/null 2>&1
  [ -f "$WORK/sshd.pid" ] && kill "$(cat "$WORK/sshd.pid")" 2>/dev/null
  id "$LOGIN" >/dev/null 2>&1 && userdel -f "$LOGIN" >/dev/null 2>&1
  [ -L /root/ray_bootstrap_key.pem ] && rm -f /root/ray_bootstrap_key.pem
  echo "logs kept in $WORK"
}
trap cleanup EXIT

echo "== login $LOGIN with the venv on its PATH"
id "$LOGIN" >/dev/null 2>&1 || useradd -o -u 0 -g 0 -M -d "$HOMEDIR" -s /bin/bash "$LOGIN"
usermod -p '*' "$LOGIN"  # no password at all, but not a locked account (sshd refuses those)
printf '%s\n' \
  '#!/usr/bin/env bash' \
  "# 'ray stop' stops this cluster only (the processes that name $WORK/cluster); the rest is Ray." \
  'if [ "${1:-}" = "stop" ]; then' \
  "  exec $VENV/bin/python -c \"import sys; sys.path.insert(0, '$ROOT/tests/integration'); from raycli import stop_cluster; stop_cluster('$WORK/cluster', 6380)\"" \
  'fi' \
  "exec $VENV/bin/ray \"\$@\"" >"$WORK/bin/ray"
chmod +x "$WORK/bin/ray"
printf '%s\n' \
  "export PATH=$WORK/bin:$VENV/bin:\$PATH" \
  "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$WORK/auth_token" >"$HOMEDIR/.bashrc"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id" -C rayflow-e2e
cp "$WORK/id.pub" "$HOMEDIR/.ssh/authorized_keys" && chmod 600 "$HOMEDIR/.ssh/authorized_keys"
# Token auth: one token for every node (one file here, as every node is this machine).
HOME="$HOMEDIR" RAY_AUTH_MODE=token "$VENV/bin/ray" get-auth-token --generate >/dev/null
cp "$HOMEDIR/.ray/auth_token" "$WORK/auth_token"

# The head's autoscaler reaches the worker with `ssh -i ~/ray_bootstrap_key.pem`, and ssh expands
# `~` from the passwd entry of its uid: for uid 0 that is /root, whatever the login. So the key
# the launcher copies to the head's home is linked there too, for the run only.
if [ ! -e /root/ray_bootstrap_key.pem ]; then ln -s "$HOMEDIR/ray_bootstrap_key.pem" /root/ray_bootstrap_key.pem; fi

echo "== sshd on 127.0.0.1:22 and 127.0.0.2:22, key-only"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/hostkey"
printf '%s\n' \
  "ListenAddress 127.0.0.1:22" "ListenAddress 127.0.0.2:22" "HostKey $WORK/hostkey" \
  "PidFile $WORK/sshd.pid" "PasswordAuthentication no" "KbdInteractiveAuthentication no" \
  "PubkeyAuthentication yes" "PermitRootLogin prohibit-password" "AllowUsers $LOGIN" \
  "StrictModes no" "UsePAM no" >"$WORK/sshd_config"
mkdir -p /run/sshd
/usr/sbin/sshd -f "$WORK/sshd_config" -E "$WORK/sshd.log"

echo "== ray up (logs: $WORK/up.log)"
sed -e "s|ssh_user: root|ssh_user: $LOGIN|" -e "s|~/.ssh/rayflow_cluster|$WORK/id|" \
  -e "s|/tmp/rayflow-cluster|$WORK/cluster|g" "$ROOT/cluster-local.yaml" >"$WORK/cluster.yaml"
cd "$ROOT"
export RAY_UP_enable_autoscaler_v2=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/auth_token"
if ! timeout 600 "$VENV/bin/ray" up -y --no-config-cache "$WORK/cluster.yaml" >"$WORK/up.log" 2>&1; then
  tail -40 "$WORK/up.log"
  exit 1
fi

echo "== ray submit jobs/pipeline.py (logs: $WORK/submit.log)"
timeout 600 "$VENV/bin/ray" submit "$WORK/cluster.yaml" jobs/pipeline.py --events "$EVENTS" \
  --partitions 8 --consumers 2 --placement resources \
  --output "$WORK/run/out" --checkpoint-dir "$WORK/run/ck" --local-paths-shared >"$WORK/submit.log" 2>&1 || {
  tail -40 "$WORK/submit.log"
  exit 1
}
grep -E "^rayflow pipeline|^  (processed|partitions|output)" "$WORK/submit.log"

echo "== check against pyarrow"
"$VENV/bin/python" "$ROOT/bench/check_keyed_output.py" "$WORK/run/out" "$EVENTS"
echo "e2e OK"
