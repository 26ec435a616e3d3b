#!/usr/bin/env bash
# Coverage-guided fuzzing of netchannel on stable Rust (libFuzzer through cargo-fuzz, no
# sanitizer: `-s none` needs no -Z flag and no nightly).
#
#   scripts/fuzz.sh                      # build, then run every target for 60 s
#   FUZZ_SECS=300 scripts/fuzz.sh        # longer
#   FUZZ_TARGETS="parse_frame" scripts/fuzz.sh
#   FUZZ_MERGE=1 scripts/fuzz.sh         # also merge the new inputs that add coverage into
#                                        # fuzz/corpus/<target> (review the diff; keep it small)
#
# Targets (fuzz/fuzz_targets/, logic in fuzz/src/): parse_frame (the flowswitch's frame and IP
# parsers, the MSS option walk, the segmentation layout), control_decode (the control
# protocol's decoder and its round trip), shm_hostile_peer (a hostile app against the nexus's
# channel server in one process).
#
# Each target starts from the committed corpus (fuzz/corpus/<target>) and from the inputs of
# bugs found before (fuzz/regressions/<target>, if any); new inputs go to a scratch directory
# (FUZZ_WORK, default a fresh temporary one), never into the repository. Exits non-zero if any
# target crashes, times out or runs out of memory, after printing where its input is and how to
# replay it (FUZZ_TRACE=1 makes shm_hostile_peer print its ops).
#
# Needs: rustup's stable toolchain, a C++ compiler (libFuzzer is C++; installed with apt-get if
# missing, as root) and crates.io (cargo-fuzz is installed, pinned, if missing). Builds with
# FUZZ_JOBS parallel jobs (default 1). A cold run (install + build + 3 x 60 s) takes about
# 6-7 minutes on 2 cores.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
SECS=${FUZZ_SECS:-60}
JOBS=${FUZZ_JOBS:-1}
TARGETS=${FUZZ_TARGETS:-"parse_frame control_decode shm_hostile_peer"}
MERGE=${FUZZ_MERGE:-0}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz="$repo/fuzz"
export CARGO_BUILD_JOBS=$JOBS
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '==> %s\n' "$*" >&2; }

# --- tools -----------------------------------------------------------------------------------
command -v cargo >/dev/null || { log "cargo not found (install Rust with rustup)"; exit 1; }
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
    log "installing g++ (libFuzzer is C++)"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    else
        log "no C++ compiler and not root: install g++"; exit 1
    fi
fi
if [ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked -j "$JOBS"
fi

# --- build -----------------------------------------------------------------------------------
# Release with debug assertions and overflow checks (cargo-fuzz's default), coverage
# instrumentation with plain -C flags, `--cfg fuzzing`.
log "building the fuzz targets ($JOBS job(s))"
cd "$repo"
build_start=$SECONDS
for t in $TARGETS; do
    cargo fuzz build --fuzz-dir "$fuzz" --sanitizer none "$t"
done
log "built in $((SECONDS - build_start)) s"
host=$(rustc -vV | sed -n 's/^host: //p')
bindir="$fuzz/target/$host/release"

# --- run -------------------------------------------------------------------------------------
work=${FUZZ_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/netchannel-fuzz.XXXXXX")}
mkdir -p "$work"
failed=()
for t in $TARGETS; do
    new="$work/corpus/$t"
    art="$work/artifacts/$t"
    mkdir -p "$new" "$art"
    inputs=("$fuzz/corpus/$t")
    [ -d "$fuzz/regressions/$t" ] && inputs+=("$fuzz/regressions/$t")
    log "fuzzing $t for $SECS s (new inputs: $new)"
    rc=0
    # -timeout: one input running this long is a hang; the outer timeout is a backstop only.
    timeout --signal=KILL $((SECS + 300)) "$bindir/$t" \
        -max_total_time="$SECS" -timeout=30 -print_final_stats=1 \
        -artifact_prefix="$art/" "$new" "${inputs[@]}" >"$work/$t.log" 2>&1 || rc=$?
    summary=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$t.log" | tail -1 || true)
    execs=$(sed -n 's/^stat::average_exec_per_sec:[[:space:]]*//p' "$work/$t.log" | tail -1)
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        log "$t FAILED (exit $rc); log: $work/$t.log"
        grep -m1 -A12 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$work/$t.log" >&2 || tail -20 "$work/$t.log" >&2
        for a in "$art"/*; do
            [ -e "$a" ] || continue
            log "crashing input: $a"
            log "replay: FUZZ_TRACE=1 $bindir/$t $a"
            # The scratch directory may not outlive a CI run: the log carries the input too.
            if [ "$(wc -c <"$a")" -le 4096 ]; then
                log "input (base64): $(base64 -w0 "$a")"
            fi
        done
    else
        log "$t ok: ${summary:-no summary} (average ${execs:-?} exec/s)"
    fi
    if [ "$MERGE" = 1 ] && [ "$rc" -eq 0 ]; then
        # Into the committed corpus go only the new inputs that add coverage to it.
        before=$(find "$fuzz/corpus/$t" -type f | wc -l)
        "$bindir/$t" -merge=1 "$fuzz/corpus/$t" "$new" >"$work/$t.merge.log" 2>&1
        after=$(find "$fuzz/corpus/$t" -type f | wc -l)
        log "$t: merged $((after - before)) new input(s) into fuzz/corpus/$t"
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    log "failed: ${failed[*]} (scratch directory kept: $work)"
    exit 1
fi
log "all targets ran $SECS s without a failure"
[ -n "${FUZZ_WORK:-}" ] || rm -rf "$work"
