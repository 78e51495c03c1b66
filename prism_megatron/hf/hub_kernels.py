"""The top-level name `kernels`: transformers imports the PyPI package of that name (Hugging Face's hub
kernels), and this checkout's kernels/ folder (imported as prism_megatron.kernels) takes the name
instead whenever the checkout's root is on sys.path (`python -m` run from it, PYTHONPATH), which breaks
`import transformers.modeling_utils`. An installed project does not expose the folder."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

OUR_KERNELS = (Path(__file__).resolve().parents[1] / "kernels").resolve()


def bind_hub_kernels() -> None:
    """If `import kernels` would give our folder, import the installed package under that name first
    (with the checkout's root left out of sys.path for the import): transformers then finds it in
    sys.modules. Without the package installed, transformers sees no usable `kernels` either way."""
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != OUR_KERNELS:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if (Path(p or ".").resolve() / "kernels").resolve() != OUR_KERNELS]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
