# Sourced by run_local.sh and run_tests.sh from the repo root: creates .venv if
# missing and installs requirements.txt into it, only when requirements.txt
# changed since the last install (its hash is kept in .venv), then the project
# itself in editable mode, which puts the `dnstap_receiver` command in .venv/bin.

pick_python() {
    local py
    for py in ${PYTHON:-} python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1; then echo "$py"; return 0; fi
    done
    return 1
}

ensure_venv() {
    local py stamp want
    if [ ! -x .venv/bin/python ]; then
        py="$(pick_python)" || { echo "no python3 found" >&2; return 2; }
        echo "creating .venv with $py" >&2
        "$py" -m venv .venv
    fi
    stamp=.venv/.requirements.sha256
    want="$(sha256sum requirements.txt | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
        echo "installing requirements.txt into .venv" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
        # setuptools warns about editable installs on every run: show its output only on failure.
        local out
        out="$(.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1)" \
            || { echo "$out" >&2; return 1; }
        echo "$want" > "$stamp"
    fi
}
