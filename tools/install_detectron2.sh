#!/usr/bin/env bash
# Make detectron2 importable in the given Python, keeping one that already is.
# detectron2 is not on PyPI under its own name. Upstream's own install is a source build:
#   python -m pip install 'git+https://github.com/facebookresearch/detectron2.git'
# Without network access beyond PyPI, this falls back to sal-detectron2, a 2024 snapshot of
# upstream's main branch published as a cp310 wheel. pip refuses that tag on other Pythons, so
# the PyPA `installer` (which checks no tags) puts it in place; its compiled _C is then not
# loaded and detectron2 uses torchvision ops and pycocotools instead, which Faster R-CNN needs.
set -euo pipefail
py=${1:?usage: install_detectron2.sh PYTHON}
version=${SAL_DETECTRON2_VERSION:-0.7.2}
here=$(cd "$(dirname "$0")/.." && pwd)

if "$py" -c "import detectron2" 2>/dev/null; then
  echo "detectron2 $("$py" -c 'import detectron2; print(detectron2.__version__)') is importable: keeping it."
  exit 0
fi

echo "Installing detectron2 from the sal-detectron2==$version wheel (no C++ ops; see README)."
# installer resolves nothing: detectron2's own requirements come first.
"$py" -m pip install -q -c "$here/constraints.txt" installer fvcore iopath pycocotools \
  "omegaconf>=2.1,<2.4" hydra-core yacs tabulate cloudpickle tqdm termcolor matplotlib Pillow \
  packaging tensorboard
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
  -d "$tmp" "sal-detectron2==$version"
"$py" -m installer "$tmp"/*.whl
"$py" -c "import detectron2; print('detectron2', detectron2.__version__, 'installed')"
