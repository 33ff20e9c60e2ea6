#!/usr/bin/env bash
# Fashion-MNIST ships as a Debian package; install it when missing and we may, else say how.
set -euo pipefail
dir="${EDGEKIT_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [ -f "$dir/t10k-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ -n "${EDGEKIT_FASHION_MNIST:-}" ]; then
  echo "EDGEKIT_FASHION_MNIST=$dir has no Fashion-MNIST IDX files (t10k-images-idx3-ubyte.gz ...)" >&2
  exit 1
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
     "or set EDGEKIT_FASHION_MNIST to a folder holding its four IDX .gz files." >&2
exit 1
