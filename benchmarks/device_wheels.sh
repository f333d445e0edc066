#!/usr/bin/env bash
# The wheels device_check.sh needs on the GPU machine (Python 3.12, no network): pydantic,
# Prefect and MLflow with what they need, less what that machine's image already holds (its
# numpy, pandas, pyarrow, scipy, torch ...), into .whl/ (ignored by git; ~60 MB, under the 64 MiB
# a call may carry). Run here, in the repo root, before the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
# the device image's packages (its page, read 2026-11-17): carried again they would only clash
HAVE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
build certifi charset-normalizer click cloudpickle cmake colorama contourpy coverage cycler
cython einops filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig jinja2 joblib kiwisolver lxml markdown
markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict mypy-extensions
networkx ninja numpy nvidia-ml-py opencv-python-headless packaging pandas pathspec patsy pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 pygments pyparsing
pytest python-dateutil pyyaml regex requests rich safetensors scikit-image scikit-learn scipy
setuptools shellingham simplejson six sortedcontainers sympy tabulate threadpoolctl tqdm typer
typing-extensions urllib3 uvloop werkzeug wheel wrapt xxhash yarl zipp torch torchvision triton"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$tmp" \
    "prefect==$("$PY" -c 'import prefect; print(prefect.__version__)')" \
    "mlflow==$("$PY" -c 'import mlflow; print(mlflow.__version__)')" \
    "pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')" 2>&1 | grep -v "^WARNING" || true
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each, or the install there stops
for f in "$tmp"/*.whl; do
    name=$(basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    case " $(echo $HAVE) " in *" $name "*) continue ;; esac
    cp "$f" "$DEST/"
done
echo "$(ls "$DEST" | wc -l) wheels in $DEST, $(du -sh "$DEST" | cut -f1)"
