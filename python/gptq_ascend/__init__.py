"""gptq-ascend: GPTQ checkpoints served by vLLM on Ascend NPUs and CPUs.

This file only names the package and its version; the README's "Layout" bullet (under
"Development") says which module does what.
"""

__version__ = "0.1.0"
