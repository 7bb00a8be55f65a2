#!/usr/bin/env bash
# A local Scabbard cluster on loopback: a 3-member etcd cluster, 2 controllers (leader
# election through etcd; one blob store directory for artifacts and archived logs, which
# on one machine stands in for an S3 bucket; each controller keeps live logs in its own
# data dir) and 2 workers. Everything lives under one directory; Ctrl-C stops it all.
#
#   deploy/local-cluster.sh [DIR]        # default DIR: ./scabbard-cluster
#
# Needs `etcd` (apt-get install etcd-server, or scripts/setup.sh) and a built `scabbard`
# (cargo build --release -p scabbard-cli; override with SCABBARD=path).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-./scabbard-cluster}
SCABBARD=${SCABBARD:-target/release/scabbard}
TOKEN=${SCABBARD_REGISTRATION_TOKEN:-local-cluster-registration-token}
command -v etcd >/dev/null || { echo "etcd not found: apt-get install etcd-server (or scripts/setup.sh)" >&2; exit 1; }
[[ -x $SCABBARD ]] || { echo "building scabbard…"; cargo build --release -p scabbard-cli; }
fresh=1
[[ -d $DIR/etcd1 ]] && fresh=0
mkdir -p "$DIR"
chmod 700 "$DIR"

# The admin API token: created once, kept in $DIR/admin.token (mode 0600), given to the
# controllers as their bootstrap token. A rerun reuses it (the cluster in etcd keeps it).
ADMIN_TOKEN_FILE="$DIR/admin.token"
if [[ ! -s $ADMIN_TOKEN_FILE ]]; then
  if [[ $fresh == 0 ]]; then
    echo "warning: $DIR already holds a cluster bootstrapped without $ADMIN_TOKEN_FILE;" >&2
    echo "         its admin token is in an old controller log; remove $DIR to start afresh" >&2
  fi
  (umask 077; echo "scbd_api_$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" >"$ADMIN_TOKEN_FILE")
fi
chmod 600 "$ADMIN_TOKEN_FILE"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# etcd: client ports 23791-23793, peer ports 23801-23803.
cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$DIR/etcd$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token scabbard-local \
    --logger=zap --log-level=warn >"$DIR/etcd$i.log" 2>&1 &
  pids+=($!)
done
endpoints="http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793"

# Controllers on 7401 and 7402.
for i in 1 2; do
  "$SCABBARD" controller --listen "127.0.0.1:740$i" --data-dir "$DIR/controller$i" \
    --store etcd --etcd-endpoints "$endpoints" --artifacts-dir "$DIR/blobs" --advertise-addr "127.0.0.1:740$i" \
    --registration-token "$TOKEN" --bootstrap-token-file "$ADMIN_TOKEN_FILE" >"$DIR/controller$i.log" 2>&1 &
  pids+=($!)
done
controllers="127.0.0.1:7401,127.0.0.1:7402"

for i in 1 2; do
  "$SCABBARD" worker --controller "$controllers" --registration-token "$TOKEN" \
    --name "worker$i" --data-dir "$DIR/worker$i" --slots 4 >"$DIR/worker$i.log" 2>&1 &
  pids+=($!)
done

echo "etcd:        $endpoints"
echo "controllers: $controllers   (logs in $DIR/*.log)"
echo
echo "admin token: in $ADMIN_TOKEN_FILE (kept across reruns)"
echo
echo "Try:  export SCABBARD_TOKEN=\$(cat $ADMIN_TOKEN_FILE)"
echo "      $SCABBARD status --controller $controllers"
echo "      $SCABBARD submit --controller $controllers --follow -- echo hello"
echo "  or save it as a context: $SCABBARD login --context local --controller $controllers <$ADMIN_TOKEN_FILE"
echo "      kill the leader (see 'status') and watch the other take over within ~5 s"
echo
echo "Ctrl-C stops the cluster."
wait
