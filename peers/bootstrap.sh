#!/usr/bin/env bash
# A DHT-only bootstrap node with a stable identity and port: the entry point of a volunteer deployment.
# Usage: peers/bootstrap.sh [PORT] [IDENTITY_FILE] [--run-id RUN ...] [--swarm-owner-key owner.key.pub]
# (the options make it refuse the records the peers of those runs would: a malformed heartbeat, a forged token)
set -euo pipefail
port="${1:-31330}"
identity="${2:-runs/bootstrap/identity.key}"
mkdir -p "$(dirname "$identity")"
exec photon-peer bootstrap --identity "$identity" --host-maddrs "/ip4/0.0.0.0/tcp/${port}" "${@:3}"
