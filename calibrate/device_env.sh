# Sourced by the device-call scripts (run_paged.sh, run_moe.sh): the device's Python with pydantic and simpy
# from .device/wheels, the environment, $OUT, and the GPU found (ID: catalog id, GPU: short name, PREFIX: the
# replays' folder prefix), its name written to $OUT/gpu.txt.
PY=${PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=python3
$PY -m pip install -q --no-index --find-links .device/wheels pydantic simpy >/dev/null 2>&1 || true
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:?set OUT}
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *H200*) ID=h200-sxm-141gb GPU=h200 PREFIX=paged_h200_ ;;
  *) ID=h100-sxm-80gb GPU=h100 PREFIX=paged_ ;;
esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
