#!/bin/sh
# Entry point of the operator and gateway images: `modelloader ARGS...`.
#
# A Ray driver must run on a node of its cluster (ray.init finds the local raylet), so when
# RAY_HEAD_ADDRESS (the GCS, host:6379) is set, this pod first joins the cluster as a node that
# offers no resources: no worker is ever placed here. The chart sets it, with POD_IP and
# RAY_ADDRESS (the same GCS address) and the Ray auth token.
set -eu
if [ -n "${RAY_HEAD_ADDRESS:-}" ]; then
    ray start \
        --address="$RAY_HEAD_ADDRESS" \
        --node-ip-address="${POD_IP:-$(hostname -i)}" \
        --num-cpus=0 --num-gpus=0 --resources='{}' \
        --object-store-memory="${RAY_OBJECT_STORE_BYTES:-80000000}" \
        --disable-usage-stats
fi
exec modelloader "$@"
