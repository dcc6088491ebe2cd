#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before `benchmarks/gpu.sh` runs on a lent GPU machine.
# Fills .gpu/ (git-ignored; the device tool carries it: carry=[".gpu"]) with what that machine
# lacks: wheels for Python 3.12, and Whisper tiny.en as int8 CTranslate2 files (the 75 MB
# PyPI package is over the 64 MiB the device tool carries; int8 is 40 MB, converted back to
# float weights by mmpipe there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  "hydra-core==$(ver hydra-core)" "omegaconf==$(ver omegaconf)" "diffusers==$(ver diffusers)" \
  "soundfile==$(ver soundfile)" \
  `# mmpipe serve and the hand-written baselines (the image has uvicorn's click/h11, httpx, prometheus-client)` \
  "fastapi==$(ver fastapi)" "starlette==$(ver starlette)" "uvicorn==$(ver uvicorn)" "pydantic==$(ver pydantic)" \
  "pydantic-core==$(ver pydantic-core)" "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" \
  "python-multipart==$(ver python-multipart)" "opentelemetry-api==$(ver opentelemetry-api)" "annotated-doc==$(ver annotated-doc)" \
  "typing-extensions==$(ver typing-extensions)" "anyio==$(ver anyio)"  # CLIP's vocabulary ships in graphs/assets
"$PY" -m pip wheel -q --no-deps -w .gpu/whl "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"  # sdist only on PyPI
"$PY" - <<'PYEOF'
from ctranslate2.converters import TransformersConverter
from mmpipe.graphs.whisper_model import resolve_model_dir
src = resolve_model_dir("package:tiny_en")  # converted (and cached) from the PyPI package
TransformersConverter(str(src), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(".gpu/whisper-tiny-en-int8", quantization="int8")
PYEOF
du -sh .gpu .gpu/* | sed 's/^/prepared: /'
