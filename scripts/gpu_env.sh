# Sourced by the scripts/gpu_*.sh scripts (from the repository root): the environment of the offline GPU machine.
#   PY              the interpreter (PYTHON, default python3)
#   PYTHONPATH      the source tree, and /tmp/site holding the wheels of ./.whl when present (ibm-fms, FlashInfer:
#                   fetched with `bash ../shared/tools/device-wheels.sh --peers`); the project is not installed,
#                   so pytest loads the plugin with `-p conformance.plugin`; GPU_ENV_SITE_READY=1 skips the
#                   install (set it for scripts started side by side after one sourcing of this file)
#   machine_info F  writes the date, the GPU(s) and the torch / CUDA / triton versions to F and prints them
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
if [ -n "${GPU_ENV_SITE_READY:-}" ]; then      # a parent already installed them: scripts running side by side
  export PYTHONPATH="/tmp/site:$PYTHONPATH"    # must not reinstall into /tmp/site at the same time
elif ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >/dev/null 2>&1; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "wheel install failed"
  fi
fi

machine_info() {
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton not importable"
  } > "$1" 2>&1
  cat "$1"
}
