"""The environment GPTQModel needs on these CPU-only machines (../shared/notes/environment.md).

Call ``use_cpu_gptqmodel()`` before gptqmodel (and ideally torch) is imported: GPTQModel reads these at
import time."""

import os


def use_cpu_gptqmodel() -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
