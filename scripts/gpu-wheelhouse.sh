#!/usr/bin/env bash
# Air-gapped GPU install, step 1, on a machine with internet: every wheel skinvlm's GPU stack needs,
# pinned by constraints-gpu.txt, for the GPU server's Python (default 3.12) on x86_64 Linux.
#
#   scripts/gpu-wheelhouse.sh DIR [PYTHON_VERSION]
#
# Step 2, on the GPU server, with DIR copied over (it holds the constraints file too):
#
#   pip install --no-index --find-links DIR -c DIR/constraints-gpu.txt "skinvlm[train,gpu,serve]"
#
# Wheels already in DIR count (--find-links): where your package index lags behind PyPI (certifi
# 2026.10.19, which unsloth, unsloth_zoo and vllm 0.33 need), put that wheel in DIR first:
#   pip download --no-deps -d DIR --index-url https://pypi.org/simple certifi==2026.10.19
set -euo pipefail
dir=${1:?usage: scripts/gpu-wheelhouse.sh DIR [PYTHON_VERSION]}
python_version=${2:-3.12}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
platforms=()
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
  manylinux_2_34 manylinux_2_35; do platforms+=(--platform "${p}_x86_64"); done

pip wheel --quiet --no-deps -w "$dir" .          # skinvlm itself (pure Python, any platform)
cp constraints-gpu.txt "$dir/"
if ! pip download --quiet -d "$dir" --find-links "$dir" -c constraints-gpu.txt \
  --only-binary=:all: --python-version "$python_version" --implementation cp "${platforms[@]}" \
  "skinvlm[train,gpu,serve]"; then
  echo "download failed; if a pinned version is missing from your index (certifi>=2026.10.19 often is)," >&2
  echo "put its wheel from https://pypi.org in $dir (see the top of this script) and run again" >&2
  exit 1
fi
du -sh "$dir"
echo "copy $dir to the GPU server, then: pip install --no-index --find-links $dir -c $dir/constraints-gpu.txt \"skinvlm[train,gpu,serve]\""
