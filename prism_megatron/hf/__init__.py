"""prism_megatron's model as a transformers model. Importing this package registers it with transformers'
Auto classes, as `import fla` does for fla's models: an export folder (`prism-ckpt export`) then loads with
AutoModelForCausalLM.from_pretrained(folder) and AutoTokenizer.from_pretrained(folder). A process that
does not import it (`lm_eval --model hf`) loads the same classes with trust_remote_code=True, through the
folder's prism_hf.py, which imports this package.
"""
from prism_megatron.hf.hub_kernels import bind_hub_kernels

bind_hub_kernels()

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from prism_megatron.hf.configuration_prism import PrismConfig  # noqa: E402
from prism_megatron.hf.modeling_prism import PrismCache, PrismForCausalLM  # noqa: E402
from prism_megatron.hf.tokenization_prism import PrismTokenizer  # noqa: E402

AutoConfig.register(PrismConfig.model_type, PrismConfig, exist_ok=True)
AutoModelForCausalLM.register(PrismConfig, PrismForCausalLM, exist_ok=True)
AutoTokenizer.register(PrismConfig, tokenizer_class=PrismTokenizer, exist_ok=True)

__all__ = ["PrismCache", "PrismConfig", "PrismForCausalLM", "PrismTokenizer"]
