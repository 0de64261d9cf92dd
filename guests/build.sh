#!/usr/bin/env bash
# Builds the rbee guests: every folder guests/<name>/ becomes the component guests/<name>.wasm.
#
#   guests/build.sh                 build every guest
#   guests/build.sh chat chat-py    build only these
#   guests/build.sh --force ...     rebuild even when the .wasm is newer than its sources
#   guests/build.sh --list          show each guest and its language, build nothing
#
# The language is told by the folder's contents:
#   Cargo.toml            Rust: a member of the workspace guests/Cargo.toml, built once for all
#                         with `cargo build --target wasm32-wasip2 --release`
#                         (into $CARGO_TARGET_DIR if set, else guests/target)
#   app.py                Python: componentize-py (module `app`)
#   package.json          JavaScript: componentize-qjs --sync, or componentize-js without
#                         wasi:http, whichever the package.json depends on; entry = its "main"
#   Makefile + *.c        C: `make OUT=... WIT=... ADAPTER=...` (wit-bindgen c, clang, wasi-libc,
#                         wasm-tools component new --adapt)
# Missing toolchains are installed from the package registries (rustup, pip, npm, apt-get,
# cargo install). A language whose toolchain cannot be had is skipped with a message, which is
# not a failure; a guest that fails to build is (exit status 1).
#
# A guest is up to date when its .wasm is newer than every file of its folder and the WIT;
# then nothing runs. Outputs are written next to the folder and renamed into place, so a
# running rbee-host that watches the file only ever sees a whole component.
set -euo pipefail

GUESTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$GUESTS")"
WIT="$ROOT/wit"
RUST_TARGET=wasm32-wasip2
# The WASI preview1 → preview2 adapter for C guests, the same release as the host's wasmtime.
ADAPTER_CRATE=wasi-preview1-component-adapter-provider
ADAPTER_VERSION=48.0.8

force=0
list=0
names=()
for arg in "$@"; do
    case "$arg" in
        -f | --force) force=1 ;;
        -l | --list) list=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
        *) names+=("${arg%/}") ;;
    esac
done

say() { printf '%s\n' "build.sh: $*" >&2; }

# The language of guests/<name>/, or nothing when the folder is not a guest.
language() {
    local dir="$GUESTS/$1"
    if [[ -f $dir/Cargo.toml ]]; then echo rust
    elif [[ -f $dir/app.py ]]; then echo python
    elif [[ -f $dir/package.json ]]; then echo js
    elif [[ -f $dir/Makefile ]] && compgen -G "$dir/*.c" >/dev/null; then echo c
    fi
}

# True when guests/<name>.wasm is missing or older than a file of the guest or of the WIT.
stale() {
    local out="$GUESTS/$1.wasm"
    ((force)) && return 0
    [[ -f $out ]] || return 0
    [[ -n $(find "$GUESTS/$1" "$WIT" \
        \( -name node_modules -o -name __pycache__ -o -name target -o -name gen -o -name build \) -prune \
        -o -type f -newer "$out" -print -quit) ]]
}

# Moves a finished build into place atomically (same folder, then rename).
install_wasm() {
    local built="$1" name="$2" tmp="$GUESTS/.$2.wasm.tmp"
    cp "$built" "$tmp"
    mv -f "$tmp" "$GUESTS/$name.wasm"
    say "$name.wasm ($(du -h "$GUESTS/$name.wasm" | cut -f1))"
}

have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
    if [[ $(id -u) == 0 ]] && have apt-get; then
        say "installing $* with apt-get"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >&2 || return 1
    else
        return 1
    fi
}

cargo_install() { # binary crate...
    local bin="$1"; shift
    have "$bin" && return 0
    have cargo || return 1
    say "installing $* with cargo install (a few minutes, once)"
    cargo install --locked "$@" >&2 || return 1
}

# ---- toolchains (each function: 0 = ready, 1 = cannot be had) ----

rust_ready() {
    have cargo || { say "no cargo: install Rust with rustup (https://rustup.rs)"; return 1; }
    if have rustup && ! rustup target list --installed 2>/dev/null | grep -qx "$RUST_TARGET"; then
        say "adding the $RUST_TARGET target with rustup"
        rustup target add "$RUST_TARGET" >&2 || return 1
    fi
}

python_ready() {
    have componentize-py && return 0
    local py
    py="$(command -v python3 || command -v python || true)"
    [[ -n $py ]] || return 1
    say "installing componentize-py with pip"
    "$py" -m pip install --quiet componentize-py >&2 && hash -r && have componentize-py
}

js_ready() { # folder
    have node && have npm || return 1
    local dir="$1"
    if [[ ! -d $dir/node_modules || $dir/package.json -nt $dir/node_modules ]]; then
        say "npm install in ${dir#"$ROOT"/}"
        if [[ -f $dir/package-lock.json ]]; then
            (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) >&2 || return 1
        else
            (cd "$dir" && npm install --no-audit --no-fund --loglevel=error) >&2 || return 1
        fi
        touch "$dir/node_modules"
    fi
}

# Prints the path of the reactor adapter, fetching its crate with cargo when needed.
adapter_path() {
    local home="${CARGO_HOME:-$HOME/.cargo}" file=wasi_snapshot_preview1.reactor.wasm found
    find_adapter() {
        find "$home/registry/src" -path "*/$ADAPTER_CRATE-$ADAPTER_VERSION/*" -name "$file" -print -quit 2>/dev/null
    }
    found="$(find_adapter)"
    if [[ -z $found ]]; then
        have cargo || return 1
        say "fetching the $ADAPTER_CRATE $ADAPTER_VERSION crate (WASI preview1 adapter)"
        local scratch
        scratch="$(mktemp -d)"
        mkdir -p "$scratch/src" && : >"$scratch/src/lib.rs"
        printf '[package]\nname = "adapter-fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n%s = "=%s"\n' \
            "$ADAPTER_CRATE" "$ADAPTER_VERSION" >"$scratch/Cargo.toml"
        (cd "$scratch" && CARGO_TARGET_DIR="$scratch/target" cargo fetch -q) >&2 || { rm -rf "$scratch"; return 1; }
        rm -rf "$scratch"
        found="$(find_adapter)"
        if [[ -z $found ]]; then # fetched but not unpacked: unpack the .crate ourselves
            local crate
            crate="$(find "$home/registry/cache" -name "$ADAPTER_CRATE-$ADAPTER_VERSION.crate" -print -quit)"
            [[ -n $crate ]] || return 1
            local dest="$home/registry/src/rbee-unpacked"
            mkdir -p "$dest" && tar -xzf "$crate" -C "$dest"
            found="$(find_adapter)"
        fi
    fi
    [[ -n $found ]] && echo "$found"
}

c_ready() {
    local missing=()
    have clang || missing+=(clang)
    have wasm-ld || missing+=(lld)
    [[ -d /usr/include/wasm32-wasi || -n ${WASI_SYSROOT:-} ]] || missing+=(wasi-libc)
    if ! compgen -G "/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a" >/dev/null &&
        [[ -z ${WASI_SYSROOT:-} ]]; then
        missing+=(libclang-rt-dev-wasm32)
    fi
    if ((${#missing[@]})); then
        apt_install "${missing[@]}" || { say "cannot install ${missing[*]}"; return 1; }
    fi
    # Only the parts the C build uses: a fraction of the full tools' build time.
    cargo_install wit-bindgen wit-bindgen-cli --no-default-features --features c ||
        { say "cannot install wit-bindgen-cli"; return 1; }
    cargo_install wasm-tools wasm-tools --no-default-features --features component,validate,print,parse ||
        { say "cannot install wasm-tools"; return 1; }
    ADAPTER="$(adapter_path)" || { say "cannot fetch the WASI preview1 adapter"; return 1; }
}

# ---- builders (each: 0 = built, 1 = failed) ----

build_rust() { # names...
    local target_dir="${CARGO_TARGET_DIR:-$GUESTS/target}" pkgs=() name crate
    for name in "$@"; do
        crate="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$GUESTS/$name/Cargo.toml" | head -1)"
        pkgs+=(-p "$crate")
    done
    say "cargo build --target $RUST_TARGET --release ${pkgs[*]}"
    (cd "$GUESTS" && cargo build --quiet --target "$RUST_TARGET" --release "${pkgs[@]}") || return 1
    local status=0
    for name in "$@"; do
        crate="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$GUESTS/$name/Cargo.toml" | head -1)"
        local built="$target_dir/$RUST_TARGET/release/${crate//-/_}.wasm"
        if [[ -f $built ]]; then
            install_wasm "$built" "$name"
        else
            say "$name: cargo built no $built (is its crate-type cdylib?)"
            status=1
        fi
    done
    return $status
}

build_python() { # name
    local name="$1" tmp
    tmp="$(mktemp -d)"
    say "componentize-py: $name"
    if (cd "$GUESTS/$name" && PYTHONDONTWRITEBYTECODE=1 componentize-py -d "$WIT" -w worker \
        componentize app -o "$tmp/out.wasm" >/dev/null); then
        install_wasm "$tmp/out.wasm" "$name"
        rm -rf "$tmp"
    else
        rm -rf "$tmp"
        return 1
    fi
}

build_js() { # name
    local name="$1" dir="$GUESTS/$1" tmp main tool
    main="$(cd "$dir" && node -p 'require("./package.json").main || "app.js"')"
    tool="$(cd "$dir" && node -p 'const p = require("./package.json"), d = {...p.dependencies, ...p.devDependencies};
        d["componentize-qjs"] ? "qjs" : d["@bytecodealliance/componentize-js"] ? "spidermonkey" : ""')"
    tmp="$(mktemp -d)"
    case "$tool" in
        qjs)
            # --sync: rbee-host does not enable component-model async.
            say "componentize-qjs --sync: $name"
            (cd "$dir" && ./node_modules/.bin/componentize-qjs --sync --wit "$WIT" --world worker \
                --js "$main" -o "$tmp/out.wasm" >/dev/null) || { rm -rf "$tmp"; return 1; }
            ;;
        spidermonkey)
            # -d http -d fetch-event: no wasi:http import (rbee-host offers none).
            say "componentize-js: $name"
            (cd "$dir" && ./node_modules/.bin/componentize-js --wit "$WIT" --world-name worker \
                -d http -d fetch-event -o "$tmp/out.wasm" "$main" >/dev/null) || { rm -rf "$tmp"; return 1; }
            ;;
        *)
            say "$name: package.json depends on neither componentize-qjs nor @bytecodealliance/componentize-js"
            rm -rf "$tmp"
            return 1
            ;;
    esac
    install_wasm "$tmp/out.wasm" "$name"
    rm -rf "$tmp"
}

build_c() { # name
    local name="$1" tmp
    tmp="$(mktemp -d)"
    say "make (wit-bindgen c, clang, wasm-tools): $name"
    if make --no-print-directory -C "$GUESTS/$name" OUT="$tmp/out.wasm" WIT="$WIT" ADAPTER="$ADAPTER" >&2; then
        install_wasm "$tmp/out.wasm" "$name"
        rm -rf "$tmp"
    else
        rm -rf "$tmp"
        return 1
    fi
}

# ---- which guests ----

if ((${#names[@]} == 0)); then
    for dir in "$GUESTS"/*/; do
        name="$(basename "$dir")"
        [[ $name == target || $name == node_modules ]] && continue
        [[ -n $(language "$name") ]] && names+=("$name")
    done
fi

if ((list)); then
    for name in "${names[@]}"; do printf '%-16s %s\n' "$name" "$(language "$name")"; done
    exit 0
fi

rust=() python=() js=() c=() failed=() skipped=()
for name in "${names[@]}"; do
    [[ -d $GUESTS/$name ]] || { say "no folder guests/$name"; failed+=("$name"); continue; }
    lang="$(language "$name")"
    case "$lang" in
        rust) rust+=("$name") ;;
        python) python+=("$name") ;;
        js) js+=("$name") ;;
        c) c+=("$name") ;;
        *) say "guests/$name: no Cargo.toml, app.py, package.json or Makefile with *.c; not a guest"; failed+=("$name") ;;
    esac
done

# Rust: one cargo build for every selected member when any of them is stale.
if ((${#rust[@]})); then
    todo=()
    for name in "${rust[@]}"; do stale "$name" && todo+=("$name"); done
    # Cargo.toml/Cargo.lock of the workspace are sources of every Rust guest too.
    if ((${#todo[@]} == 0)); then
        for name in "${rust[@]}"; do
            if [[ $GUESTS/Cargo.toml -nt $GUESTS/$name.wasm || $GUESTS/Cargo.lock -nt $GUESTS/$name.wasm ]]; then
                todo=("${rust[@]}"); break
            fi
        done
    fi
    if ((${#todo[@]})); then
        if rust_ready; then
            build_rust "${todo[@]}" || failed+=("${todo[@]}")
        else
            say "skipping Rust guests (${todo[*]}): no Rust toolchain with $RUST_TARGET"
            skipped+=("${todo[@]}")
        fi
    fi
fi

if ((${#python[@]})); then
    todo=()
    for name in "${python[@]}"; do stale "$name" && todo+=("$name"); done
    if ((${#todo[@]})); then
        if python_ready; then
            for name in "${todo[@]}"; do build_python "$name" || failed+=("$name"); done
        else
            say "skipping Python guests (${todo[*]}): componentize-py cannot be installed (needs python3 and pip)"
            skipped+=("${todo[@]}")
        fi
    fi
fi

for name in ${js[@]+"${js[@]}"}; do
    stale "$name" || continue
    if js_ready "$GUESTS/$name"; then
        build_js "$name" || failed+=("$name")
    else
        say "skipping JavaScript guest $name: node/npm missing or npm install failed"
        skipped+=("$name")
    fi
done

if ((${#c[@]})); then
    todo=()
    for name in "${c[@]}"; do stale "$name" && todo+=("$name"); done
    if ((${#todo[@]})); then
        if c_ready; then
            for name in "${todo[@]}"; do build_c "$name" || failed+=("$name"); done
        else
            say "skipping C guests (${todo[*]}): toolchain (clang, lld, wasi-libc, wit-bindgen, wasm-tools) unavailable"
            skipped+=("${todo[@]}")
        fi
    fi
fi

((${#skipped[@]})) && say "skipped (toolchain unavailable): ${skipped[*]}"
if ((${#failed[@]})); then
    say "FAILED: ${failed[*]}"
    exit 1
fi
exit 0
