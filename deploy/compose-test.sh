#!/usr/bin/env bash
# The compose test: brings compose.yaml up from nothing on a Debian machine, checks it from
# the host with tritonclient, scales the ONNX Runtime hosts, stops one, and tears all down.
#
#   sudo deploy/compose-test.sh        (root; docs/deployment.md#the-compose-test)
#
# Exit codes: 0 passed, 77 skipped (no way to get a container engine here; says why),
# anything else failed. It leaves the machine as it found it: containers, networks and the
# images it built are removed; dockerd, the docker0 bridge, iptables rules and ip_forward
# are put back; the Debian packages it installed (docker.io, docker-compose, debootstrap,
# iptables) stay installed. The debootstrap base image is kept only if it was there before.
#
# Environment: DESPINA_PYTHON (python with tritonclient; default .venv/bin/python),
# DESPINA_COMPOSE (force "docker compose" or "docker-compose"), DEBIAN_MIRROR.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

PROJECT=despinacomposetest
IMAGE=despina:compose-test
BASE_TAG=despina-base:bookworm
PY="${DESPINA_PYTHON:-$ROOT/.venv/bin/python}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
START=$(date +%s.%N)
LAST=$START
STEP=
STATE="$(mktemp -d /tmp/despina-compose-test.XXXXXX)"
WORK="$STATE/work"
mkdir -p "$WORK"

step() {  # ends the step under way (its duration) and starts the next (time since start)
    local now
    now=$(date +%s.%N)
    awk -v n="$now" -v s="$START" -v l="$LAST" -v prev="$STEP" -v upcoming="$*" 'BEGIN {
        if (prev != "") printf "[compose-test]   took %5.1fs: %s\n", n - l, prev
        printf "[compose-test] at %6.1fs: %s\n", n - s, upcoming }'
    LAST=$now
    STEP="$*"
}
skip() { echo "[compose-test] SKIPPED: $*"; exit 77; }

# --- can a container engine be had here? ---------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root (to install and start a container engine)"
command -v apt-get >/dev/null || skip "not a Debian machine (no apt-get)"
[ -x "$PY" ] || skip "no python with tritonclient at $PY (set DESPINA_PYTHON)"
"$PY" -c 'import tritonclient.http, tritonclient.grpc' 2>/dev/null \
    || skip "$PY lacks tritonclient"

step "recording the machine's state"
had_dockerd=0; pgrep -x dockerd >/dev/null && had_dockerd=1
had_varlib=0; [ -e /var/lib/docker ] && had_varlib=1
had_docker0=0; ip link show docker0 >/dev/null 2>&1 && had_docker0=1
touch "$STATE/iptables.rules"
command -v iptables-save >/dev/null && iptables-save >"$STATE/iptables.rules"
ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)
had_base=unknown
DOCKERD_PID=
HTTP_PID=
COMPOSE=()
PULLED=
DOCKER_BIN=$(command -v docker || echo /usr/bin/docker)
docker() { "$DOCKER_BIN" "$@"; }

teardown() {
    local code=$?
    set +e
    trap - EXIT INT TERM
    step "tearing down"
    if [ "${#COMPOSE[@]}" -gt 0 ]; then
        "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 5 >"$STATE/down.log" 2>&1 \
            || cat "$STATE/down.log"
    fi
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    if docker info >/dev/null 2>&1; then
        docker image rm -f "$IMAGE" >/dev/null 2>&1
        [ "$had_base" = 0 ] && docker image rm -f "$BASE_TAG" >/dev/null 2>&1
        [ -n "$PULLED" ] && docker image rm -f "$PULLED" >/dev/null 2>&1
        docker image prune -f --filter "label=despina.compose-test=1" >/dev/null 2>&1
        docker builder prune -f >/dev/null 2>&1
    fi
    find deploy/docker/pip -mindepth 1 -not -name README.md -not -name .gitignore -delete
    if [ "$had_dockerd" = 0 ] && [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        # dockerd's own containerd and shims leave with it; their mounts may stay behind.
        grep -o ' /var/lib/docker[^ ]*\| /run/docker[^ ]*' /proc/mounts | sort -r \
            | while read -r m; do umount -l "$m" 2>/dev/null; done
        [ "$had_varlib" = 0 ] && rm -rf /var/lib/docker
        rm -rf /run/docker /var/run/docker.sock /run/containerd/containerd.sock 2>/dev/null
    fi
    if [ "$had_docker0" = 0 ] && ip link show docker0 >/dev/null 2>&1; then
        ip link del docker0
    fi
    if command -v iptables-restore >/dev/null; then
        # Empty every table dockerd touched, then put back the rules there were (none when
        # iptables was not installed yet or had no tables).
        for t in filter nat mangle raw; do
            iptables -t "$t" -F 2>/dev/null; iptables -t "$t" -X 2>/dev/null
        done
        iptables -P INPUT ACCEPT; iptables -P FORWARD ACCEPT; iptables -P OUTPUT ACCEPT
        [ -s "$STATE/iptables.rules" ] && iptables-restore <"$STATE/iptables.rules"
    fi
    echo "$ip_forward" >/proc/sys/net/ipv4/ip_forward
    rm -rf "$STATE"
    if [ "$code" = 0 ]; then step "compose test passed"; elif [ "$code" = 77 ]; then :; else
        step "compose test FAILED (exit $code)"; fi
    exit "$code"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --- the engine ---------------------------------------------------------------------------
apt_install() {  # installs the Debian packages named that are missing
    local missing=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ "${#missing[@]}" -eq 0 ] && return 0
    step "installing ${missing[*]} (apt)"
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq >>"$STATE/apt.log" 2>&1 || return 1
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >>"$STATE/apt.log" 2>&1
}

# An engine that already answers is used as it is (with its own client); otherwise Debian's
# engine is installed and started, and Debian's client talks to it (another docker on PATH
# may be of another make or version).
if ! [ -x "$DOCKER_BIN" ] || ! "$DOCKER_BIN" info >/dev/null 2>&1; then
    apt_install docker.io iptables || skip "cannot install docker.io: $(tail -1 "$STATE/apt.log")"
    DOCKER_BIN=/usr/bin/docker
fi

if ! docker info >/dev/null 2>&1; then
    step "starting dockerd"
    dockerd >"$STATE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 "$STATE/dockerd.log"; skip "dockerd does not start here"; }
fi

if [ -n "${DESPINA_COMPOSE:-}" ]; then
    read -r -a COMPOSE_CMD <<<"$DESPINA_COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=("$DOCKER_BIN" compose)
else
    command -v docker-compose >/dev/null || apt_install docker-compose \
        || skip "neither 'docker compose' (v2) nor 'docker-compose' (v1) can be had here"
    COMPOSE_CMD=(docker-compose)
fi
echo "[compose-test] engine: $(docker version -f '{{.Server.Version}}'), client $DOCKER_BIN," \
    "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || true))"

# --- the base image -------------------------------------------------------------------------
had_base=0; docker image inspect "$BASE_TAG" >/dev/null 2>&1 && had_base=1
BASE=python:3.11-slim
if docker image inspect "$BASE" >/dev/null 2>&1; then
    :
elif timeout 60 docker pull -q "$BASE" >/dev/null 2>&1; then
    step "pulled $BASE"
    PULLED=$BASE
elif [ "$had_base" = 1 ]; then
    step "no registry reachable: using the cached $BASE_TAG"
    BASE=$BASE_TAG
else
    apt_install debootstrap || { tail -5 "$STATE/apt.log"; exit 1; }
    step "no registry reachable: building $BASE_TAG with debootstrap (python3 from Debian)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log"; exit 1; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE_TAG" >/dev/null
    rm -rf "$WORK/rootfs"
    BASE=$BASE_TAG
fi

# --- the Despina image ----------------------------------------------------------------------
step "building $IMAGE on $BASE"
build_args=(--build-arg "BASE_IMAGE=$BASE")
# The builder's pip settings: its certificate authorities (a TLS-inspecting proxy), index
# and constraints, as the Dockerfile takes them.
cert="${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}"
[ -n "$cert" ] && [ -f "$cert" ] && cp "$cert" deploy/docker/pip/builder-ca.crt
index="${PIP_INDEX_URL:-$("$PY" -m pip config get global.index-url 2>/dev/null || true)}"
case "$index" in http*) build_args+=(--build-arg "PIP_INDEX_URL=$index") ;; esac
constraint="${PIP_CONSTRAINT:-$("$PY" -m pip config get global.constraint 2>/dev/null || true)}"
# A constraint file is honoured only where it does not pin to local-only files.
[ -n "$constraint" ] && [ -f "$constraint" ] && cp "$constraint" deploy/docker/pip/constraints.txt
# PyTorch's CPU index unreachable but a CPU wheel on disk: serve it to the build as an index.
wheel=$(ls /opt/wheels/torch-*+cpu-cp311-*.whl "${PIP_FIND_LINKS:-/nonexistent}"/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)
if ! timeout 10 "$PY" -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=8)' 2>/dev/null; then
    if [ -n "$wheel" ] && [ "$BASE" = "$BASE_TAG" ] && [[ "$wheel" == *cp311* ]]; then
        gateway=$(ip -4 -o addr show docker0 | awk '{ split($4, a, "/"); print a[1] }')
        mkdir -p "$WORK/index/torch"
        ln -s "$wheel" "$WORK/index/torch/"
        (cd "$WORK/index" && exec "$PY" -m http.server --bind "$gateway" 8765) >"$STATE/http.log" 2>&1 &
        HTTP_PID=$!
        version=$(basename "$wheel" | cut -d- -f2)
        build_args+=(--build-arg "TORCH_INDEX_URL=http://$gateway:8765/"
            --build-arg "PIP_TRUSTED_HOST=$gateway" --build-arg "TORCH_SPEC=torch==$version")
        echo "[compose-test] PyTorch's index is unreachable: torch $version from $wheel"
    else
        build_args+=(--build-arg "DESPINA_EXTRAS=")
        echo "[compose-test] PyTorch's index is unreachable and no CPU wheel is at hand: image without PyTorch"
    fi
fi
DOCKER_BUILDKIT=0 docker build -q --label despina.compose-test=1 -t "$IMAGE" \
    "${build_args[@]}" . >"$STATE/build.log" 2>&1 || { tail -40 "$STATE/build.log"; exit 1; }
[ -n "$HTTP_PID" ] && { kill "$HTTP_PID"; HTTP_PID=; }

# --- compose up and the checks ----------------------------------------------------------------
export DESPINA_IMAGE=$IMAGE
export DESPINA_FRONTENDS=2  # frontend processes in the frontend container, sharing its ports
COMPOSE=("${COMPOSE_CMD[@]}" -p "$PROJECT" -f compose.yaml -f deploy/compose/host-shm.yaml)
step "compose up"
"${COMPOSE[@]}" up -d --no-build >"$STATE/up.log" 2>&1 || { cat "$STATE/up.log"; exit 1; }
sleep 3
exited=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter status=exited)
[ -z "$exited" ] || { "${COMPOSE[@]}" logs --tail 30; echo "a container exited at start"; exit 1; }
step "checking over HTTP and gRPC (ready, ONNX, Python, 256 KiB via /dev/shm)"
"$PY" deploy/compose_check.py serve --timeout 120 || { "${COMPOSE[@]}" logs --tail 30; exit 1; }

step "checking that both frontend processes serve (shared ports 8000/8001)"
scheduler=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=scheduler")
frontend=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=frontend")
mapfile -t replies < <(docker logs "$scheduler" 2>&1 \
    | grep -o 'frontend joined; replies go to [^ ]*' | awk '{ print $NF }' | sort -u)
echo "[compose-test] frontends joined the scheduler, replies to: ${replies[*]}"
[ "${#replies[@]}" = "$DESPINA_FRONTENDS" ] \
    || { docker logs --tail 20 "$frontend"; echo "expected $DESPINA_FRONTENDS frontends"; exit 1; }
"$PY" deploy/compose_check.py frontends --container "$frontend" --expect "$DESPINA_FRONTENDS" \
    --docker "$DOCKER_BIN" --timeout 60 || { docker logs --tail 20 "$frontend"; exit 1; }

step "scaling backend-onnxruntime to 2"
"${COMPOSE[@]}" up -d --no-build --no-recreate --scale backend-onnxruntime=2 >"$STATE/up.log" 2>&1 \
    || { cat "$STATE/up.log"; exit 1; }
mapfile -t onnx < <(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=backend-onnxruntime")
[ "${#onnx[@]}" = 2 ] || { echo "expected 2 backend-onnxruntime containers, got ${#onnx[@]}"; exit 1; }
joined=0
for _ in $(seq 120); do
    joined=$(docker logs "$scheduler" 2>&1 | grep -c '(onnxruntime, pid [0-9]*) joined' || true)
    [ "$joined" -ge 2 ] && break; sleep 0.5
done
echo "[compose-test] the scheduler logged $joined onnxruntime host(s) joining"
[ "$joined" -ge 2 ] || { docker logs --tail 20 "$scheduler"; exit 1; }
"$PY" deploy/compose_check.py serve --timeout 60
# Per-host placement (the default): each host loads every model of its framework, so both
# serve. A host's log line may reach `docker logs` a moment late: look for up to 30 s.
for _ in $(seq 60); do
    serving=() standby=()
    for c in "${onnx[@]}"; do
        if docker logs "$c" 2>&1 | grep -q "loaded 'simple'"; then
            serving+=("$c")
        else
            standby+=("$c")
        fi
    done
    [ "${#serving[@]}" -ge 2 ] && break; sleep 0.5
done
echo "[compose-test] onnxruntime hosts: ${#serving[@]} loaded simple, ${#standby[@]} did not"
if [ "${#serving[@]}" -lt 2 ]; then
    echo "not both onnxruntime hosts loaded simple; their logs and the scheduler's:"
    for c in "${onnx[@]}"; do docker logs --tail 15 "$c" 2>&1 | sed "s/^/[${c:0:12}] /"; done
    docker logs --tail 25 "$scheduler" 2>&1 | sed "s/^/[scheduler] /"
    exit 1
fi

step "stopping onnxruntime host ${serving[0]:0:12}"
docker stop -t 5 "${serving[0]}" >/dev/null
"$PY" deploy/compose_check.py wait --timeout 90
survivor=$(printf '%s\n' "${onnx[@]}" | grep -v "${serving[0]}" | head -1)
took_over=0
for _ in $(seq 60); do
    if docker logs "$survivor" 2>&1 | grep -q "loaded 'simple'"; then took_over=1; break; fi
    sleep 0.5
done
[ "$took_over" = 1 ] || { echo "the other host ${survivor:0:12} did not load simple"; exit 1; }
echo "[compose-test] host ${survivor:0:12} serves simple alone"
"$PY" deploy/compose_check.py serve --timeout 60
