#!/usr/bin/env bash
# Pure-Python wheels of what the GPU machine lacks for the end-to-end part of bench/gpu_check.sh (open_clip_torch,
# ftfy, webdataset and their dependencies that the machine's image does not have), for CPython 3.12. The GPU machine
# has no package registry, so these travel with the tree and install there offline into a temporary target:
#
#   bash bench/gpu_wheels.sh                   # here, once: fills bench/wheels/ (git-ignored)
#   bash bench/gpu_wheels.sh --verify PYTHON   # here: offline install into a fresh target, import open_clip from it
#                                              # (PYTHON: a Python 3.12 that has torch, like the GPU machine's)
#
# bench/gpu_check.sh installs the folder when it is there. torch, torchvision and the other dependencies listed in
# ON_GPU_MACHINE are never downloaded: the GPU machine's image has them (torch 2.11, compiled for its CUDA), and a
# second copy would shadow it. Every wheel must be py3-none-any (pure Python): the script refuses anything else.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHEELS_DIR:-bench/wheels}
PY=${PYTHON:-python3}
# The versions the project's tests run with (pyproject dependencies, installed by `make install`).
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7)
# Required by the wheels above and already in the GPU machine's image (/work/.library/device/KINDS.md, package list
# of 2026-11-17). A requirement that is neither here nor in the folder fails the script.
ON_GPU_MACHINE="torch torchvision regex tqdm huggingface-hub safetensors timm numpy pyyaml"

check_requirements() {  # every non-extra Requires-Dist of every wheel: in the folder or on the GPU machine
    "$PY" - "$DEST" "$ON_GPU_MACHINE" <<'EOF'
import pathlib, re, sys, zipfile
folder, present = pathlib.Path(sys.argv[1]), set(sys.argv[2].split())

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

wheels = sorted(folder.glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels}
missing, impure = [], [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)", line).group(1))
                if name not in have and name not in present:
                    missing.append(f"{w.name} needs {name}")
if "torch" in have or "torchvision" in have:
    sys.exit(f"{folder}: holds torch/torchvision; the GPU machine's own build must be used")
if impure:
    sys.exit(f"{folder}: not pure-Python wheels: {impure}")
if missing:
    sys.exit(f"{folder}: requirements neither in the folder nor on the GPU machine: {missing}")
print(f"{folder}: {len(wheels)} pure-Python wheels, requirements met (with the GPU machine's {sorted(present)})")
EOF
}

if [ "${1:-}" = "--verify" ]; then
    TARGET_PY=${2:?"--verify needs a Python 3.12 that has torch, e.g. bash bench/gpu_wheels.sh --verify python3.12"}
    [ -d "$DEST" ] || { echo "$DEST does not exist: run bash bench/gpu_wheels.sh first" >&2; exit 2; }
    check_requirements
    TARGET=$(mktemp -d)
    trap 'rm -rf "$TARGET"' EXIT
    # The same install as on the GPU machine: no index, no dependency resolution (torch is the machine's own).
    "$TARGET_PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$DEST" --target "$TARGET" \
        "$DEST"/*.whl
    PYTHONPATH="$TARGET" "$TARGET_PY" -c "
import sys, open_clip, ftfy, webdataset, torch
assert open_clip.__file__.startswith('$TARGET'), open_clip.__file__
model = open_clip.create_model('ViT-B-16', pretrained=None)
print('python', sys.version.split()[0], '| torch', torch.__version__, '| open_clip', open_clip.__version__,
      'from the target | ftfy', ftfy.__version__, '| webdataset', webdataset.__version__,
      '| ViT-B-16 params', sum(p.numel() for p in model.parameters()))"
    exit 0
fi

rm -rf "$DEST"
mkdir -p "$DEST"
# --platform any --implementation py --abi none: only pure-Python wheels match; --no-deps: the dependencies the GPU
# machine has are not fetched (the check below proves the rest are in WHEELS).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
    --platform any -d "$DEST" "${WHEELS[@]}"
check_requirements
du -sh "$DEST"
