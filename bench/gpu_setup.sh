#!/usr/bin/env bash
# Prepare the lent GPU machine (no network): install, from wheels carried in .wheels/, only what is missing.
set -u
for spec in "diffusers:diffusers" "PIL:pillow" "importlib_metadata:importlib_metadata" "zipp:zipp" \
            "requests:requests" "urllib3:urllib3" "certifi:certifi" "charset_normalizer:charset_normalizer" \
            "idna:idna" "regex:regex" "safetensors:safetensors"; do
  mod=${spec%%:*}; whl=${spec##*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .wheels/${whl}-*.whl
done
# bench/batch.py's serve stage: FastAPI + uvicorn and their dependencies (pure-Python wheels, except pydantic_core:
# carry the one built for the GPU machine's Python)
for spec in "fastapi:fastapi" "starlette:starlette" "pydantic:pydantic" "pydantic_core:pydantic_core" \
            "annotated_types:annotated_types" "typing_inspection:typing_inspection" "annotated_doc:annotated_doc" \
            "typing_extensions:typing_extensions" "anyio:anyio" "idna:idna" "opentelemetry:opentelemetry_api" \
            "uvicorn:uvicorn" "h11:h11" "click:click"; do
  mod=${spec%%:*}; whl=${spec##*:}
  python3 -c "import $mod" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .wheels/${whl}-*.whl \
    || echo "note: no wheel for $whl in .wheels/: bench/batch.py's serve stage will fail (the others run)"
done
python3 -c "import safetensors, sys; sys.exit(0 if tuple(map(int, safetensors.__version__.split('.')[:2])) >= (0, 8) else 1)" || python3 -m pip install -q --no-index --no-deps .wheels/safetensors-*.whl
python3 -c "import safetensors, diffusers; print('diffusers', diffusers.__version__, 'safetensors', safetensors.__version__)"
