#!/usr/bin/env bash
# `make image-test`: build the CPU image and run the project inside it as its non-root user (uid 1000).
#
# Checks: the image's user and imports (torch CPU build, kfp 2.17.3, editinfinity), `editinfinity demo` (output
# files and summary checked on the host), and the edit pipeline in its three modes through
# `editinfinity pipeline run-local --runner docker` with the toy preset and 2+2 training updates: auto with one
# container per stage, mask and whole with the fused container (every component of the edit pipelines once;
# outputs checked), plus a deliberately broken input that must fail the run. Prints the image sizes, the machine's
# load and the seconds of every step.
#
# Environment: DOCKER (docker|podman; default: a docker whose engine answers, else podman), CPU_IMAGE (tag),
# BASE (registry|local; default: registry when the Dockerfile's python image is present or pullable, else the
# Debian-made base of images/base/), TORCH_INDEX_URL / TORCH_WHEELS (torch source of the CPU image; default: the
# PyTorch index when reachable, else a local torch-X+cpu wheel found by pip), IMAGE_TEST_STRICT=1 (a machine that
# cannot build or run containers fails instead of skipping), IMAGE_TEST_REBUILD=1 (build even when the image
# already carries this commit's revision label and the tree is clean), IMAGE_TEST_WORK (work folder, default
# build/image-test).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PY:-$ROOT/.venv/bin/python}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
WORK="${IMAGE_TEST_WORK:-$ROOT/build/image-test}"
mkdir -p "$WORK"
T0=$SECONDS
TIMINGS=()

say() { printf '\n== image-test: %s\n' "$*" >&2; }
fail() { printf '\nimage-test FAILED: %s\n' "$*" >&2; report; exit 1; }
# A machine that cannot build or run containers at all is not a defect of the project: say so loudly and stop
# (exit 0), unless IMAGE_TEST_STRICT=1.
skip() {
    printf '\nimage-test SKIPPED (this machine cannot build/run containers): %s\n' "$*" >&2
    [ "${IMAGE_TEST_STRICT:-0}" = 1 ] && exit 1
    exit 0
}
# timed NAME LIMIT CMD...: run CMD, record its seconds under NAME. LIMIT only turns a hang into a message before
# CI's own limit does: it is far above what a step takes on CI's 2 cores (a shared, overloaded machine is slower).
timed() {
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    if [ "$(type -t "$1")" = function ]; then STEP_LIMIT=$limit "$@" || rc=$?
    else timeout -k 30 "$limit" "$@" || rc=$?; fi
    TIMINGS+=("$(printf '%-34s %5d s' "$name" $((SECONDS - start)))")
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        echo "image-test: $name did not finish within $limit s (a hung engine, or a machine far slower than CI)" >&2
        cleanup_containers
    fi
    return $rc
}
# Containers of this test left running when a step is stopped (a container's PID 1 ignores SIGTERM): removed.
cleanup_containers() {
    local ids
    ids=$("$DOCKER" ps -aq --filter "label=io.editinfinity.test=$$" 2>/dev/null || true)
    [ -z "${kfp_root:-}" ] || ids="$ids $("$DOCKER" ps -aq --filter "label=io.editinfinity.pipeline-root=$kfp_root" \
        2>/dev/null || true)"
    # shellcheck disable=SC2086
    [ -z "${ids// /}" ] || "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
}
report() {
    printf '\n== image-test timings (load average at the start: %s, at the end: %s; %s CPUs)\n' "$LOAD0" \
        "$(cut -d' ' -f1-3 /proc/loadavg)" "$(nproc)" >&2
    printf '  %s\n' "${TIMINGS[@]}" "${SIZES[@]}" >&2
    printf '  %-34s %5d s\n' "total" $((SECONDS - T0)) >&2
}
SIZES=()
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
image_size() {  # image_size NAME TAG: record the image's size for the report
    local bytes
    bytes=$("$DOCKER" image inspect -f '{{.Size}}' "$2" 2>/dev/null) || return 0
    SIZES+=("$(printf '%-34s %5d MB' "size of $1" $((bytes / 1000000)))")
}

# ---- the engine -------------------------------------------------------------------------------------------------
if [ -z "${DOCKER:-}" ]; then
    if docker info >/dev/null 2>&1; then DOCKER=docker
    elif command -v podman >/dev/null 2>&1; then DOCKER=podman
    else skip "neither a docker engine nor podman (apt-get install podman runc debootstrap)"; fi
fi
ENGINE_ARGS=()   # for build and run
RUN_ARGS=()      # for run only
if [ "$(basename "$DOCKER")" = podman ]; then
    # Facts of Debian's podman 4.3 on hosts with hybrid cgroups (docs/kubeflow.md): crun cannot start containers
    # there, runc can; and containers may not raise rlimits (podman's defaults, nofile 1048576 and nproc 4194304,
    # are refused; nproc 65536 was refused too, 32768 not): nofile as this shell has it, nproc 4096 at most.
    command -v runc >/dev/null 2>&1 && ENGINE_ARGS+=(--runtime runc)
    nproc=$(ulimit -Su)
    { [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ]; } && nproc=4096
    RUN_ARGS+=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Sn)" --ulimit "nproc=$nproc:$nproc")
fi
export DOCKER
# An engine that is installed but cannot work here (no storage driver, no user namespaces in a nested sandbox) is
# this machine's limit, not a defect of the project.
"$DOCKER" info >/dev/null 2>"$WORK/engine-info.err" \
    || skip "$DOCKER is installed but does not work here: $(head -c 300 "$WORK/engine-info.err")"

# can_run IMAGE: start a container of a base image that is not ours (or our plain Debian base) and run `true`; a
# machine whose runtime cannot start containers (cgroups, seccomp, namespaces) skips instead of failing.
can_run() {
    timeout -k 10 300 "$DOCKER" run --rm "${ENGINE_ARGS[@]}" "${RUN_ARGS[@]}" "$1" true >/dev/null 2>"$WORK/can-run.err" \
        || skip "$DOCKER cannot start a container of $1 here: $(head -c 300 "$WORK/can-run.err")"
}

# ---- build (skipped when the image was built from this very commit and the tree is clean) ----------------------
build() {
    PYTHON_IMAGE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' images/cpu.Dockerfile)
    if [ -z "${BASE:-}" ]; then
        if "$DOCKER" image inspect "$PYTHON_IMAGE" >/dev/null 2>&1 \
            || timeout 300 "$DOCKER" pull -q "$PYTHON_IMAGE" >/dev/null 2>&1; then BASE=registry
        else BASE=local; fi
    fi
    if [ "$BASE" = local ]; then
        [ "$(id -u)" = 0 ] || skip "no registry base ($PYTHON_IMAGE cannot be pulled) and debootstrap needs root"
        command -v debootstrap >/dev/null 2>&1 || skip "no registry base and no debootstrap (apt-get install debootstrap)"
        mirror="${MIRROR:-http://deb.debian.org/debian}"
        curl -sSf -o /dev/null --max-time 30 "$mirror/dists/${SUITE:-bookworm}/Release" 2>/dev/null \
            || skip "no registry base and the Debian mirror $mirror cannot be reached for debootstrap (set MIRROR)"
    else
        can_run "$PYTHON_IMAGE"
    fi
    curl -sSf -o /dev/null --max-time 30 https://pypi.org/simple/pip/ 2>/dev/null \
        || skip "PyPI (https://pypi.org/simple/) cannot be reached: the image builds install from it"
    TORCH_ARGS=()
    if [ -n "${TORCH_WHEELS:-}" ]; then TORCH_ARGS=(TORCH_WHEELS="$TORCH_WHEELS")
    elif [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_ARGS=(TORCH_INDEX_URL="$TORCH_INDEX_URL")
    elif ! curl -sSf -o /dev/null --max-time 30 https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
        # No PyTorch index: a torch-X+cpu wheel that pip finds without an index (its find-links / wheel folders).
        mkdir -p "$WORK/torch-wheel"
        "$PY" -m pip download -q --no-index --no-deps --only-binary :all: -d "$WORK/torch-wheel" \
            "torch==${TORCH_VERSION}+cpu" >/dev/null 2>&1 \
            || skip "no torch source: download.pytorch.org is unreachable and pip finds no torch==${TORCH_VERSION}+cpu wheel locally (set TORCH_WHEELS=DIR)"
        TORCH_ARGS=(TORCH_WHEELS="$WORK/torch-wheel")
    fi
    if [ "$BASE" = local ]; then
        base_image=$(make -s --no-print-directory print-base-image)
        what="build base image (debootstrap)"
        "$DOCKER" image inspect "$base_image" >/dev/null 2>&1 && what="base image (already built)"
        timed "$what" 1800 make -s base-image BASE=local BUILD_ARGS="${ENGINE_ARGS[*]}" \
            || fail "building the Debian base image (images/base/build.sh) failed"
        image_size "base image" "$base_image"
        can_run "$base_image"
    fi

    say "building $CPU_IMAGE (base: $BASE, torch: ${TORCH_ARGS[*]:-Dockerfile default}, engine: $DOCKER ${ENGINE_ARGS[*]})"
    timed "build CPU image" 3600 make -s images-cpu BASE="$BASE" "${TORCH_ARGS[@]}" BUILD_ARGS="${ENGINE_ARGS[*]}" \
        CPU_IMAGE="$CPU_IMAGE" || fail "building $CPU_IMAGE failed (log above)"
}
head=$(git rev-parse HEAD 2>/dev/null || echo unknown)
built_from=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$CPU_IMAGE" \
    2>/dev/null || true)
if [ "${IMAGE_TEST_REBUILD:-0}" != 1 ] && [ "$head" != unknown ] && [ "$built_from" = "$head" ] \
    && git diff --quiet HEAD -- 2>/dev/null; then
    say "reusing $CPU_IMAGE: built from $head, the tree is clean (IMAGE_TEST_REBUILD=1 builds anyway)"
else
    build
fi
size=$("$DOCKER" image inspect -f '{{.Size}}' "$CPU_IMAGE")
image_size "CPU image" "$CPU_IMAGE"
revision=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$CPU_IMAGE")
say "$CPU_IMAGE: $((size / 1000000)) MB, revision label $revision"
case "$revision" in "$head"|"$head-dirty") ;; *) fail "the image's revision label is $revision, the checkout is $head";; esac

# ---- inside the image, as its non-root user -----------------------------------------------------------------
drun() {
    timeout -k 30 "${STEP_LIMIT:-1800}" "$DOCKER" run --rm --label "io.editinfinity.test=$$" "${ENGINE_ARGS[@]}" \
        "${RUN_ARGS[@]}" "$@"
}
rm -rf "$WORK/demo"
mkdir -p "$WORK/demo"
chmod 0777 "$WORK/demo"   # the image's uid 1000 writes here

say "user and imports"
# Every module of the three packages (a file missing from the wheel shows here), then the versions.
timed "imports (uid 1000)" 900 drun "$CPU_IMAGE" python -c '
import importlib, os, pkgutil, sys
import components, editinfinity, kfp, pipelines, torch
names = [m.name for p in (editinfinity, components, pipelines) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(len(names), "modules imported", file=sys.stderr)
print(os.getuid(), os.getgid(), editinfinity.__version__, kfp.__version__, torch.__version__, torch.cuda.is_available())
' >"$WORK/imports.txt" || fail "the import check failed inside $CPU_IMAGE"
cat "$WORK/imports.txt"
read -r uid gid ei_version kfp_version torch_version cuda <"$WORK/imports.txt"
[ "$uid:$gid" = 1000:1000 ] || fail "the image runs as $uid:$gid, not the non-root 1000:1000"
[ "$kfp_version" = 2.17.3 ] || fail "kfp $kfp_version in the image, the pipelines are compiled with 2.17.3"
[ "$ei_version" = "$("$PY" -c 'import editinfinity; print(editinfinity.__version__)')" ] \
    || fail "editinfinity $ei_version in the image differs from the checkout's"
case "$torch_version" in "$TORCH_VERSION"*) ;; *) fail "torch $torch_version in the image, expected $TORCH_VERSION";; esac
[ "$cuda" = False ] || fail "torch.cuda.is_available() is $cuda in the CPU image"

say "pipeline compile in the image = on the host"
rm -rf "$WORK/compile" && mkdir -p "$WORK/compile/host" "$WORK/compile/image" && chmod 0777 "$WORK/compile/image"
timed "pipeline compile (uid 1000)" 900 drun -v "$WORK/compile/image:/out" "$CPU_IMAGE" \
    editinfinity pipeline compile edit --profile gke-l4 --out /out >/dev/null || fail "pipeline compile failed in the image"
"$ROOT/.venv/bin/editinfinity" pipeline compile edit --profile gke-l4 --out "$WORK/compile/host" >/dev/null
cmp "$WORK/compile/host/edit-gke-l4.yaml" "$WORK/compile/image/edit-gke-l4.yaml" \
    || fail "the pipeline compiled in the image differs from the host's (diff -r $WORK/compile/host $WORK/compile/image)"

say "editinfinity demo"
timed "editinfinity demo (uid 1000)" 3600 drun -v "$WORK/demo:/out" "$CPU_IMAGE" editinfinity demo --out /out/demo -q \
    || fail "editinfinity demo failed inside $CPU_IMAGE"
"$PY" tests/image_outputs.py "$WORK/demo/demo" auto \
    --case core/editinfinity/assets/examples/shapes/case.json || fail "the demo's output is wrong (above)"

# ---- the edit pipeline, every task in a container (run-local --runner docker) -----------------------------------
if [ "$(basename "$DOCKER")" = podman ]; then
    # podman's Docker-compatible API on a socket of our own; the runtime is chosen here (podman 4.3's API ignores a
    # per-container one).
    sock="$WORK/podman.sock"
    rm -f "$sock"
    podman "${ENGINE_ARGS[@]}" system service --time=0 "unix://$sock" >"$WORK/podman-service.log" 2>&1 &
    service_pid=$!
    trap 'kill "$service_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 60); do [ -S "$sock" ] && break; sleep 0.5; done
    [ -S "$sock" ] || fail "podman system service did not start (log: $WORK/podman-service.log)"
    export DOCKER_HOST="unix://$sock"
fi
kfp_root="$WORK/kfp"
# (Files the containers wrote belong to their uid: a non-root caller may be unable to remove an old root.)
rm -rf "$kfp_root" 2>/dev/null || kfp_root="$WORK/kfp-$$"
mkdir -p "$kfp_root"
ex=core/editinfinity/assets/examples/shapes
pipeline() {  # pipeline NAME MODE [run-local args...]: run the toy edit in containers, then check its output
    local name=$1 mode=$2
    shift 2
    say "edit pipeline: $name"
    timed "pipeline $name" 3600 "$ROOT/.venv/bin/editinfinity" pipeline run-local edit --runner docker \
        --image "$CPU_IMAGE" --pipeline-root "$kfp_root" -p image_uri="$ex/image.png" \
        -p prompt="a red circle and a blue square on a gray background" \
        -p edit_prompt="a green circle and a blue square on a gray background" \
        -p preset=toy -p prompt_iters=2 -p lora_iters=2 -p mode="$mode" \
        -p output_uri="$kfp_root/out/$name" "$@" >"$WORK/$name.log" 2>&1 \
        || { tail -40 "$WORK/$name.log" >&2; fail "run-local --runner docker ($name) failed (log: $WORK/$name.log)"; }
    grep -E "Executing task|finished with status" "$WORK/$name.log" | sed 's/\x1b\[[0-9;]*m//g' >&2 || true
    "$PY" tests/image_outputs.py "$kfp_root/out/$name" "$mode" || fail "pipeline $name: wrong output (above)"
}
# One pod per stage for auto (check-case, prepare, tune-prompt, train-lora, attention, mask, generate, summarize);
# the fused pod (check-case, fused-edit, summarize) for mask and whole: every component of the edit pipelines runs
# at least once, and every mode once. (Per-stage mask mode differs from auto only in the mask task's input.)
pipeline auto auto -p target_word=circle
pipeline mask-fused mask --fused -p mask_uri="$ex/mask.png"
pipeline whole-fused whole --fused

say "a failing task must fail the run (kubeflow/pipelines#13332 reports it as SUCCESS)"
printf 'this is not a PNG\n' >"$WORK/bad.png"
rc=0
timed "pipeline with a broken input" 1800 "$ROOT/.venv/bin/editinfinity" pipeline run-local edit --runner docker --fused \
    --image "$CPU_IMAGE" --pipeline-root "$kfp_root" -p image_uri="$WORK/bad.png" -p prompt="a red circle" \
    -p edit_prompt="a green circle" -p mode=whole -p preset=toy -p prompt_iters=1 -p lora_iters=1 \
    -p output_uri="$kfp_root/out/bad" >"$WORK/bad.log" 2>&1 || rc=$?
sed 's/\x1b\[[0-9;]*m//g' "$WORK/bad.log" | grep -E "InvalidCaseError|FAILURE" >&2 || true
[ "$rc" != 0 ] || fail "a pipeline whose task failed exited 0 (log: $WORK/bad.log)"
grep -q "finished with status FAILURE" "$WORK/bad.log" || fail "the failed run does not say which task failed"
grep -q "bad.png (field \`image\`) is not an image" "$WORK/bad.log" \
    || fail "the failed run's log does not name the broken input and its problem (log: $WORK/bad.log)"
[ ! -e "$kfp_root/out/bad" ] || fail "the failed run published output to $kfp_root/out/bad"

report
say "passed"
