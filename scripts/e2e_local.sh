#!/usr/bin/env bash
# End to end on a local Ray cluster, the way a cluster is used:
#   ray start --head -> ray job submit (extraction) -> ray job submit (training: C-Net, identity,
#   expression) -> serve deploy -> a real /v1/predict request -> ray stop.
# Usage: scripts/e2e_local.sh [IMAGES] [WORKDIR]     (defaults: ../shared/data/yalefaces, a temp dir)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
IMAGES="$(realpath "${1:-../shared/data/yalefaces}")"
WORK="$(realpath -m "${2:-$(mktemp -d /tmp/facedist-e2e.XXXXXX)}")"
mkdir -p "$WORK"
BIN="$REPO/.venv/bin"
[ -x "$BIN/ray" ] || BIN="$(dirname "$(command -v ray)")"
export PATH="$BIN:$PATH"   # job entrypoints run `python`: the one facedist is installed in
export FACEDIST_MODEL_DIR="${FACEDIST_MODEL_DIR:-$(realpath ../shared/models)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # workers import facedist from the repo
# Every port of its own, so another Ray on this machine (a notebook, a test) cannot collide; all
# bound at once, so no two of them are the same (ports asked for one at a time can repeat).
read -r GCS_PORT DASH_PORT HTTP_PORT AGENT_PORT AGENT_GRPC_PORT ENV_AGENT_PORT METRICS_PORT CLIENT_PORT \
    NODE_PORT OBJECT_PORT < <("$BIN/python" -c '
import socket
sockets = [socket.socket() for _ in range(10)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))')
PORT_FLAGS=(--dashboard-agent-listen-port "$AGENT_PORT" --dashboard-agent-grpc-port "$AGENT_GRPC_PORT"
            --runtime-env-agent-port "$ENV_AGENT_PORT" --metrics-export-port "$METRICS_PORT"
            --ray-client-server-port "$CLIENT_PORT" --node-manager-port "$NODE_PORT"
            --object-manager-port "$OBJECT_PORT")
export RAY_ADDRESS="http://127.0.0.1:$DASH_PORT"
step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }   # seconds since the start

# Token auth on (Ray 2.5x+): the head, the job CLI and serve all use the same token file.
export RAY_AUTH_MODE=token
[ -s "$HOME/.ray/auth_token" ] || "$BIN/ray" get-auth-token --generate >/dev/null

# Ray's unix sockets live under its temp dir and must stay under 107 bytes: keep it short.
RAY_TMP="$(mktemp -d /tmp/fdray.XXXXXX)"

# Stop only this cluster (`ray stop` would stop every Ray on the machine): the processes that
# carry its own temp dir or GCS port on their command lines, and everything they started. The
# raylet's children (dashboard agent, workers, actors) rename themselves ("ray::DashboardAgent"),
# and an agent left without its raylet spins a core for about a minute.
descendants() { local p; for p in "$@"; do echo "$p"; descendants $(pgrep -P "$p"); done; }
stop_cluster() {
    local pids alive
    pids=$(descendants $(pgrep -f -- "$RAY_TMP|:$GCS_PORT( |$)") | sort -u)
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 30); do   # up to 3 s
        alive=$(for p in $pids; do if kill -0 "$p" 2>/dev/null; then echo "$p"; fi; done)
        [ -n "$alive" ] || break
        sleep 0.1
    done
    kill -KILL $alive 2>/dev/null || true
    rm -rf "$RAY_TMP" || true
}
trap stop_cluster EXIT

step "ray start --head (GCS :$GCS_PORT, dashboard :$DASH_PORT)"
"$BIN/ray" start --head --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
    --num-cpus "${E2E_CPUS:-2}" --temp-dir "$RAY_TMP" "${PORT_FLAGS[@]}" --disable-usage-stats \
    >"$WORK/ray_start.log" 2>&1 || { tail -5 "$WORK/ray_start.log"; exit 1; }

# The dashboard agent, which runs submitted jobs, comes up a little after the head: wait until
# its HTTP port answers (any status: with token auth on, an unauthenticated probe gets a 401).
agent_up() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$AGENT_PORT/")" != 000 ]; }
for _ in $(seq 1 600); do agent_up && break; sleep 0.2; done
agent_up || { echo "the Ray dashboard agent never came up"; exit 1; }

step "ray job submit: extraction"
"$BIN/ray" job submit --working-dir . -- \
    python jobs/extract.py --input "$IMAGES" --output "$WORK/coefficients" --backend tddfa --actors 2 --no-progress

# One job trains them in turn (identity takes the C-Net trained just before it): one driver's start,
# not three. A submitted job's runtime env rules (facedist.runtime): it carries the poll interval
# facedist's own Ray Train runs use (Ray's default, 2 s, would pace every report).
step "ray job submit: training cnet, identity, expression"
"$BIN/ray" job submit --working-dir . \
    --runtime-env-json '{"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}}' -- \
    python jobs/train.py --task cnet identity expression --data "$WORK/coefficients" --output "$WORK/models" \
    --epochs "${E2E_EPOCHS:-8}" --cpus-per-worker 1 --text

step "serve deploy (models from $WORK/models, HTTP :$HTTP_PORT)"
"$BIN/python" - "$WORK/models" "$HTTP_PORT" "$WORK/serve.yaml" <<'PY'
import sys, yaml
models, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = yaml.safe_load(open("serve/config.yaml"))
config["http_options"].update(host="127.0.0.1", port=port)
app = config["applications"][0]
# One replica of each deployment on this small cluster: ServeSettings fields, like every option.
app["args"].update(models_uri=models, extractor_num_cpus=0.5, max_replicas=1, recognizer_max_replicas=1,
                   ingress_max_replicas=1)
yaml.safe_dump(config, open(out, "w"))
PY
"$BIN/serve" deploy "$WORK/serve.yaml" -a "$RAY_ADDRESS"
for _ in $(seq 1 360); do
    if curl -sf "http://127.0.0.1:$HTTP_PORT/v1/health" >/dev/null; then break; fi
    sleep 0.5
done
curl -sf "http://127.0.0.1:$HTTP_PORT/v1/models"; echo

step "predict: three photos of subject05"
curl -sf -X POST "http://127.0.0.1:$HTTP_PORT/v1/predict" \
    -F "images=@$IMAGES/subject05.happy" -F "images=@$IMAGES/subject05.normal" \
    -F "images=@$IMAGES/subject05.sad" -o "$WORK/predict.json"
"$BIN/python" - "$WORK/predict.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
identity = result["identity"]
assert identity and identity["top_k"], result
print("identity top-3:", [(t["label"], round(t["score"], 3)) for t in identity["top_k"][:3]])
expressions = [(img.get("expression") or {}).get("label") for img in result["images"]]
assert all(expressions), result["images"]
print("expressions:", expressions)
PY
step "e2e passed; outputs in $WORK"
