#!/usr/bin/env bash
# Prints the path of a working Python 3.12 interpreter, or explains on stderr and exits 1.
# megatron-core 0.19 needs Python >= 3.12. Order: $PYTHON, python3.12 on PATH, then pyenv.
# A pyenv shim named python3.12 can exist on PATH yet fail when 3.12 is not the active
# version, so every candidate is run once before it is trusted.
set -u
works() { "$@" -c 'import sys, venv; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }

if [ -n "${PYTHON:-}" ] && works "$PYTHON"; then command -v "$PYTHON"; exit 0; fi
for cand in python3.12 python3; do
  if command -v "$cand" >/dev/null 2>&1 && works "$cand"; then
    # Resolve through the shim so the venv records a real interpreter.
    "$cand" -c 'import sys; print(sys.executable)'; exit 0
  fi
done
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
    exe="$(pyenv root)/versions/$v/bin/python3.12"
    if [ -x "$exe" ] && works "$exe"; then echo "$exe"; exit 0; fi
  done
fi
echo "error: no Python 3.12 found (megatron-core 0.19 needs it). Install one (e.g. 'pyenv install 3.12'," \
     "or your distribution's python3.12 with venv), or point PYTHON=/path/to/python3.12 at it." >&2
exit 1
