#!/usr/bin/env bash
# An averaging helper next to the bootstrap node: trains nothing, joins every round with weight 0, so rounds of
# client-mode volunteers behind NATs have a peer that leads them, reduces their parts and serves the state
# (README "Volunteers behind NAT"). Start it before the volunteers: it starts the run, or joins it from a live
# reachable silo (it refuses to start on a model of its own while peers are live).
# Usage: peers/helper.sh CONFIG [BOOTSTRAP_MADDR] [PORT] [IDENTITY_FILE] [photon-peer run options ...]
set -euo pipefail
config="${1:?usage: peers/helper.sh CONFIG [BOOTSTRAP_MADDR] [PORT] [IDENTITY_FILE] [options ...]}"
bootstrap="${2:-}"
port="${3:-31340}"
identity="${4:-runs/helper/identity.key}"
mkdir -p "$(dirname "$identity")"
exec photon-peer run --config "$config" --helper --identity "$identity" --host-maddrs "/ip4/0.0.0.0/tcp/${port}" \
    ${bootstrap:+--initial-peers "$bootstrap"} "${@:5}"
