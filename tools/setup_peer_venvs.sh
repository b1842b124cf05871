#!/usr/bin/env bash
# Separate venvs for the peer frameworks the benchmarks compare against (mace-torch pins e3nn 0.4.4,
# which would clash with mlfound's e3nn 0.6 in one environment).
#   bash tools/setup_peer_venvs.sh            # creates .venv-mace and .venv-nequip next to .venv
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-mace && .venv-mace/bin/pip install -q torch==2.13.0 mace-torch
python3 -m venv .venv-nequip && .venv-nequip/bin/pip install -q torch==2.13.0 nequip
.venv-mace/bin/python -c "import mace, e3nn; print('mace', mace.__version__, 'e3nn', e3nn.__version__)"
.venv-nequip/bin/python -c "import nequip, e3nn; print('nequip', nequip.__version__, 'e3nn', e3nn.__version__)"
