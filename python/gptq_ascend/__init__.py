"""gptq-ascend: GPTQ checkpoints served by vLLM on Ascend NPUs and CPUs.

Modules: ``format`` (the GPTQ format, the one owner), ``checkpoint`` (safe reading and streaming
writing of checkpoints), ``convert`` (offline mode), ``ops`` + ``backends`` (the op contract and its
implementations), ``vllm_plugin`` (online mode), ``cli`` (the `gptq-ascend` command).
"""

__version__ = "0.1.0"
