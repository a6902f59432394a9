#!/usr/bin/env bash
# Wheels that bring Ray to a lent GPU machine (which has torch but no Ray and no network), small
# enough to travel with one call (64 MiB in all): Ray's own wheel is 79 MB, most of it a Java jar
# and the dashboard's source maps, which neuroal never uses; this script drops them and repacks.
#
#   bash launch/gpu_ray_wheels.sh            # -> .whl/ (ignored by git), about 45 MB
#
# Then, on the device (run's carry: [".whl"]), before launch/gpu_check.sh:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=.:/tmp/site
# The version is the one of this machine's Ray, so driver and actors match the tests here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VERSION="${RAY_VERSION:-$("$PY" -c 'import ray; print(ray.__version__)')}"
DEST=.whl
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || \
  echo '/.whl/' >> .git/info/exclude
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PLATFORMS="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
# Ray and the requirements the device image lacks (jsonschema and its own)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $PLATFORMS -d "$TMP" "ray==$VERSION" jsonschema jsonschema-specifications referencing rpds-py
for wheel in "$TMP"/*.whl; do
  name=$(basename "$wheel")
  if [[ "$name" == ray-* ]]; then
    mkdir "$TMP/ray"
    (cd "$TMP/ray" && unzip -q "$wheel" && rm -rf ray/jars ray/dashboard/client/build \
      && find . -name '*.map' -delete && zip -q -r "$OLDPWD/$DEST/$name" .)
  else
    cp "$wheel" "$DEST/"
  fi
done
du -ch "$DEST"/*.whl | tail -1
