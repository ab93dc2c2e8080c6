#!/usr/bin/env bash
# Build docker/Dockerfile.cpu without any registry or internet access, then smoke-test the image.
#
#   docker/build-cpu-image.sh [--start-daemon [--keep-daemon]] [--make-base] [--tag crfr-cpu:TAG] [--data LFW_DIR]
#                             [--step-cmd 'CMD'] [--serve] [--serve-tag crfr-serve:TAG] [--no-smoke]
#
# Images are tagged with the tag derived from their sources (`python -m pipeline.images tag`: src-<12 hex>),
# never a moving tag: kfp's cache and a node's image cache key on the tag (pipeline/images.py).
#
# Offline means: no image pull (the base image is made locally with debootstrap, --make-base), and pip
# inside the build installs only from a local wheelhouse served on 127.0.0.1 over plain HTTP (so the
# image needs neither the PyTorch index nor this host's TLS interception CA). The wheelhouse is built
# from requirements.lock by the host's pip, which knows the host's package mirrors.
#
# --start-daemon starts a private dockerd when none answers (docker/dockerd.sh: no bridge, no iptables, no IP
# forwarding or masquerading, all state under $CRFR_DOCKER_ROOT); the script stops that daemon when it exits,
# unless --keep-daemon (then `eval "$(docker/dockerd.sh env)"` points docker at it, `docker/dockerd.sh stop`).
# --make-base makes the local base image when it is missing (Debian bookworm: Python 3.11, like
# python:3.11-slim-bookworm). Needs root, debootstrap and the Debian mirror.
#
# The smoke test runs the image the way Kubernetes does (uid 10001, read-only root, no network) and, when
# LFW is at hand (--data, $CRFR_LFW_ROOT or ../shared/data/lfw), one real pipeline step on tiny data:
# components.prepare with the "tiny" profile, LFW mounted read-only.
#
# --serve also builds docker/Dockerfile.serve (the `crfr serve` image) from the same base and wheelhouse.
# Both images record the commit they were built from (VCS_REF, VCS_DIRTY -> CRFR_GIT_COMMIT / CRFR_GIT_DIRTY).
#
# Timings and the image size go to stdout; run it as `nice -n 19 docker/build-cpu-image.sh ... 2>&1 | tee LOG`.
set -euo pipefail

cd "$(dirname "$0")/.."

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
SOURCE_TAG=$("$PY" -m pipeline.images tag)
TAG=crfr-cpu:$SOURCE_TAG
BASE_IMAGE=crfr-local/python:3.11-bookworm
START_DAEMON=0
MAKE_BASE=0
STEP_CMD=""
SERVE=0
SERVE_TAG=crfr-serve:$SOURCE_TAG
KEEP_DAEMON=0
SMOKE=1
DATA_DIR=${CRFR_LFW_ROOT:-../shared/data/lfw}
DOCKER_ROOT=${CRFR_DOCKER_ROOT:-/tmp/crfr-docker}
WHEELHOUSE=${CRFR_WHEELHOUSE:-/tmp/crfr-wheelhouse}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --start-daemon) START_DAEMON=1 ;;
    --keep-daemon) KEEP_DAEMON=1 ;;
    --no-smoke) SMOKE=0 ;;
    --make-base) MAKE_BASE=1 ;;
    --tag) TAG=$2; shift ;;
    --base-image) BASE_IMAGE=$2; shift ;;
    --step-cmd) STEP_CMD=$2; shift ;;
    --serve) SERVE=1 ;;
    --serve-tag) SERVE_TAG=$2; SERVE=1; shift ;;
    --data) DATA_DIR=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }
T0=$SECONDS
elapsed() { echo "$((SECONDS - $1))s"; }

STARTED_DAEMON=0
HTTP_PID=""
cleanup() {
  if [ -n "$HTTP_PID" ]; then kill "$HTTP_PID" 2>/dev/null || true; fi
  if [ "$STARTED_DAEMON" = 1 ] && [ "$KEEP_DAEMON" != 1 ]; then
    log "stopping the dockerd this script started"
    docker/dockerd.sh stop
  fi
}
trap cleanup EXIT

# --- 1. a Docker daemon -----------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  eval "$(docker/dockerd.sh env)"
  if ! docker info >/dev/null 2>&1; then
    if [ "$START_DAEMON" != 1 ]; then
      echo "no Docker daemon answers (DOCKER_HOST=${DOCKER_HOST:-default}); pass --start-daemon to start one" >&2
      exit 1
    fi
    log "starting dockerd (docker/dockerd.sh; state in ${CRFR_DOCKER_ROOT:-/tmp/crfr-docker})"
    eval "$(docker/dockerd.sh start)"
    STARTED_DAEMON=1
  fi
fi
# --- 2. the base image ------------------------------------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if [ "$MAKE_BASE" != 1 ]; then
    echo "base image $BASE_IMAGE is missing; pass --make-base to create it with debootstrap" >&2
    exit 1
  fi
  command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
  t=$SECONDS
  rootfs="$DOCKER_ROOT/rootfs-bookworm"
  rm -rf "$rootfs"
  log "debootstrap bookworm (minbase + python3, python3-venv) into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$DEBIAN_MIRROR" \
    >"$DOCKER_ROOT/debootstrap.log" 2>&1 || { tail -20 "$DOCKER_ROOT/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  log "base image $BASE_IMAGE made in $(elapsed $t): $(docker run --rm --network none "$BASE_IMAGE" python3 --version)"
fi

# --- 3. a local wheelhouse, served on 127.0.0.1 ------------------------------------------------------
# Debian bookworm's python3 is 3.11.2: below 3.11.3, redis (from the lock) also needs async-timeout,
# which the lock, resolved on a newer 3.11, does not list. python:3.11-slim-bookworm does not need it.
EXTRA_WHEELS="pip==25.3 async-timeout==5.0.1"
want=$(cat requirements.lock requirements-nodeps.txt <(echo "$EXTRA_WHEELS") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$WHEELHOUSE/.lock.sha256" 2>/dev/null)" != "$want" ]; then
  t=$SECONDS
  log "building the wheelhouse $WHEELHOUSE from requirements.lock"
  mkdir -p "$WHEELHOUSE"
  "$PY" -m pip wheel -q -r requirements.lock $EXTRA_WHEELS -w "$WHEELHOUSE" 2>&1 | grep -v '^WARNING: Location' || true
  "$PY" -m pip wheel -q --no-deps -r requirements-nodeps.txt -w "$WHEELHOUSE" 2>&1 | grep -v '^WARNING: Location' || true
  ls "$WHEELHOUSE"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 \
    || { echo "the wheelhouse has no CPU torch wheel (set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)" >&2; exit 1; }
  echo "$want" >"$WHEELHOUSE/.lock.sha256"
  log "wheelhouse ready in $(elapsed $t)"
fi
log "wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
# A fixed port: the wheelhouse URL is a build arg, and a new value each time would invalidate Docker's
# layer cache for the dependency layer (minutes). A random free port only when that one is taken.
PORT=${CRFR_WHEELHOUSE_PORT:-38765}
if ! "$PY" -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$PORT" 2>/dev/null; then
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log "port ${CRFR_WHEELHOUSE_PORT:-38765} is taken: serving wheels on $PORT (the dependency layer will be rebuilt)"
fi
"$PY" -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$PORT" >/dev/null 2>&1 &
HTTP_PID=$!
for _ in $(seq 20); do "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break; sleep 0.5; done

# --- 4. build ---------------------------------------------------------------------------------------
# The legacy builder where BuildKit (buildx) is absent: the Dockerfile uses no BuildKit-only syntax.
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi
VCS_REF=$(git rev-parse HEAD 2>/dev/null || echo unknown)
VCS_DIRTY=unknown
if [ "$VCS_REF" != unknown ]; then
  if [ -z "$(git status --porcelain 2>/dev/null)" ]; then VCS_DIRTY=false; else VCS_DIRTY=true; fi
fi
BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build() {  # build DOCKERFILE TAG
  local t=$SECONDS size
  log "docker build -f $1 -t $2 (base $BASE_IMAGE, wheels from http://127.0.0.1:$PORT/, commit $VCS_REF dirty=$VCS_DIRTY)"
  # --network host: the only way for RUN steps to reach 127.0.0.1 when the daemon runs without a bridge.
  docker build --network host -f "$1" -t "$2" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="http://127.0.0.1:$PORT/" \
    --build-arg VCS_REF="$VCS_REF" \
    --build-arg VCS_DIRTY="$VCS_DIRTY" \
    --build-arg BUILD_DATE="$BUILD_DATE" \
    .
  size=$(docker image inspect -f '{{.Size}}' "$2")
  log "built $2 in $(elapsed $t); size $((size / 1000000)) MB ($size bytes)"
}
build docker/Dockerfile.cpu "$TAG"
if [ "$SERVE" = 1 ]; then build docker/Dockerfile.serve "$SERVE_TAG"; fi
kill "$HTTP_PID" 2>/dev/null || true
HTTP_PID=""

if [ "$SMOKE" != 1 ]; then log "built; no smoke test (--no-smoke); total $(elapsed $T0)"; exit 0; fi
# --- 5. smoke test, the way Kubernetes runs it --------------------------------------------------------
# No network, read-only root with a tmpfs /tmp, uid 10001, no capabilities, no privilege escalation.
run() {
  docker run --rm --network none --read-only --tmpfs /tmp:rw,size=512m \
    --user 10001:10001 --cap-drop ALL --security-opt no-new-privileges "$@"
}
t=$SECONDS
if [ -f crfr/cli.py ]; then
  log "run: crfr --help"
  run "$TAG" crfr --help
else
  log "crfr/cli.py does not exist yet: skipping crfr --help"
fi
if [ -f components/prepare.py ]; then
  log "run: python -m components.prepare --help"
  run "$TAG" python -m components.prepare --help
else
  log "components/prepare.py does not exist yet: skipping python -m components.prepare --help"
fi
log "run: imports + one tiny synthetic step (OpenCV degrade 112->14->112, a conv net forward/backward)"
run -i "$TAG" python - <<'EOF'
import os, cv2, mlflow, numpy as np, torch, crfr
assert os.getuid() == 10001, os.getuid()
assert torch.version.cuda is None, torch.version.cuda
rng = np.random.default_rng(0)
hr = rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
lr = np.stack([cv2.resize(cv2.resize(im, (14, 14), interpolation=cv2.INTER_LINEAR), (112, 112),
                          interpolation=cv2.INTER_LINEAR) for im in hr])
x = torch.from_numpy(lr).permute(0, 3, 1, 2).float().div(255)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                          torch.nn.Flatten(), torch.nn.Linear(8, 4))
loss = net(x).logsumexp(1).mean()
loss.backward()
print(f"ok: crfr {crfr.__version__}, torch {torch.__version__}, cv2 {cv2.__version__}, mlflow {mlflow.__version__}, "
      f"loss {loss.item():.4f}")
EOF
if [ -f components/prepare.py ] && [ -f "$DATA_DIR/pairs.txt" ]; then
  log "run: python -m components.prepare --set profile=tiny on $DATA_DIR (mounted read-only at /data/lfw)"
  run -v "$(cd "$DATA_DIR" && pwd):/data/lfw:ro" "$TAG" \
    python -m components.prepare --set profile=tiny --source /data/lfw --out /tmp/prepared --no-progress
else
  log "no LFW data at $DATA_DIR (or no components/prepare.py): skipping the tiny prepare step"
fi
if [ -n "$STEP_CMD" ]; then
  log "run: $STEP_CMD"
  # shellcheck disable=SC2086  # word splitting wanted: STEP_CMD is a command line
  run "$TAG" $STEP_CMD
fi
log "run: the recorded commit (CRFR_GIT_COMMIT) is the one built"
recorded=$(run "$TAG" python -c "from crfr.registry.lineage import git_state; print('lineage commit', *git_state())")
echo "$recorded"
[[ "$recorded" == "lineage commit $VCS_REF $VCS_DIRTY" ]] || { echo "the image records another commit" >&2; exit 1; }
if [ "$SERVE" = 1 ]; then
  log "serving image $SERVE_TAG: $(docker image inspect -f 'user {{.Config.User}}, ports {{.Config.ExposedPorts}}, cmd {{.Config.Cmd}}' "$SERVE_TAG")"
  run "$SERVE_TAG" crfr serve --help >/dev/null
  log "run: $SERVE_TAG crfr serve --help: ok"
fi
log "smoke tests passed in $(elapsed $t); total $(elapsed $T0)"
docker image ls "$TAG"
