# Sourced by the benchmarks' GPU scripts (*_gpu.sh, gpu_kernel_check.sh) on a GPU machine without this
# project installed (the device tool's): installs the wheels of shared/device/fetch-wheels.sh (carry
# .whl) into /tmp/prism_site, puts the checkout and them on PYTHONPATH (prism_megatron/ links kernels/,
# launch/ and data_prep/), turns NVLink multicast off, and enters the checkout. Sets `root`.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/prism_site "$root"/.whl/*.whl \
    || exit 1
export PYTHONPATH="$root:/tmp/prism_site${PYTHONPATH:+:$PYTHONPATH}"
cd "$root" || exit 1
