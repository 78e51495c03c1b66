"""The start-up chatter of the libraries under us, kept out of every command's output.

Importing megatron-core without Transformer Engine and Apex (this project uses neither) warns four
times that they are missing, and its Megatron-FSDP (unused here) logs which variant it picked. At
start-up DeepSpeed probes for libaio by compiling a test program, whose commands setuptools'
compiler logs, and on the CPU prints that it built its shared-memory op. None of it says anything
about the run. Exactly these messages are dropped; every other warning, log record and line still
shows. `prism_megatron/__init__.py` imports this module, so the filters are in place before any
command imports megatron-core or DeepSpeed.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed",
                        category=UserWarning, module=r"megatron\.core\.")

_FSDP_ANNOUNCEMENTS = ("Using Megatron-FSDP without Transformer Engine",
                       "Detected Megatron Core, using Megatron-FSDP with Megatron")
for _module in ("mixed_precision", "param_and_grad_buffer", "megatron_fsdp"):
    logging.getLogger(f"megatron.core.distributed.fsdp.src.megatron_fsdp.{_module}").addFilter(
        lambda record: not record.getMessage().startswith(_FSDP_ANNOUNCEMENTS))

# setuptools' C compiler logs each command it runs at INFO, which our commands show: DeepSpeed's probe
# for libaio compiles and links a test program at every start.
logging.getLogger("compilers.C.base").setLevel(logging.WARNING)

_SHM_OP_BUILT = re.compile(r"^DeepSpeed \S+shm_comm_op built successfully\n", re.MULTILINE)


@contextlib.contextmanager
def deepspeed_start():
    """Around deepspeed.initialize: without the line saying that its shared-memory op was built
    (printed at every start on the CPU); whatever else it prints is passed on when it returns."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        sys.stdout.write(_SHM_OP_BUILT.sub("", printed.getvalue()))
