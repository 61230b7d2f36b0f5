#!/usr/bin/env bash
# Builds .gpu-wheels/: the wheels stream_st needs on the GPU machine that its image lacks, for
# scripts/gpu-check.sh (benchmarks/README.md, "GPU check"). Run it here, where PyPI is reachable; the
# device machine reaches nothing and has its own CUDA torch, so torch is never downloaded.
#
# What the image holds is read from /work/.library/device/KINDS.md ("Python packages already there",
# as read on 2026-11-17); wheels of those packages are dropped, except the fsspec family (fsspec,
# s3fs, gcsfs), which is carried at this venv's versions so that the device runs what was tested here.
# The result must stay well under the device tool's 64 MiB carry limit (the script prints its size).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# git-ignored without touching the tracked .gitignore
if [ -d .git ] && ! grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo "/$DEST/" >>.git/info/exclude
fi

version() { "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"; }
pin() { local v; v=$(version "$1"); if [ -n "$v" ]; then echo "$1==$v"; else echo "$2"; fi; }

# The fsspec family at this venv's versions when they agree; gcsfs pins its own fsspec, so it is left
# to the resolver when the venv's gcsfs wants another fsspec than the venv's.
REQS=("$(pin fsspec 'fsspec>=2024.6')" "$(pin s3fs 's3fs>=2024.6')" "gcsfs>=2024.6")

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
"$PY" -m pip download -q --dest "$DEST.tmp" --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any \
    "${REQS[@]}" 2> >(grep -v "is neither a file nor a directory" >&2)

# Drop what the image already has (normalised names), keep the fsspec family.
IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
KEEP="fsspec s3fs gcsfs"
rm -rf "$DEST" && mkdir -p "$DEST"
for whl in "$DEST.tmp"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    if [[ " $KEEP " == *" $name "* ]] || [[ " $(echo $IMAGE_HAS) " != *" $name "* ]]; then
        mv "$whl" "$DEST/"
    fi
done
rm -rf "$DEST.tmp"
case "$(ls "$DEST" | grep -c '^torch-' || true)" in 0) ;; *) echo "torch must not be carried" >&2; exit 1 ;; esac
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) ($(du -sb "$DEST" | cut -f1) bytes; carry limit 64 MiB with the tree)"
