"""`gptq-ascend inspect SRC`: what a GPTQ checkpoint holds and which modes can run it here."""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import format as fmt
from .checkpoint import ST_ITEMSIZE, Checkpoint
from .convert import layer_metas
from .units import human_bytes


@dataclass
class Mode:
    name: str
    runnable: bool
    why: str


@dataclass
class LayerShape:
    """The quantized layers of one setting and shape, and the backend each device would run them on.

    Shapes are the checkpoint's modules at tensor_parallel_size 1 (vLLM fuses q/k/v and gate/up into
    one matrix of the summed N, which every backend takes whenever it takes the parts).
    """

    setting: str
    in_features: int
    out_features: int
    layers: int
    cpu_backend: str  # what ops.choose_backend picks on CPU (the plugin's and verify's choice)
    cpu_why: str
    npu_backend: str | None = None  # only where torch_npu is installed
    npu_why: str = ""


@dataclass
class Inspection:
    path: str
    settings: dict
    quantized_layers: int
    plain_tensors: int
    layer_settings: dict[str, int]
    stored_bytes: int
    fp16_bytes: int
    modes: list[Mode] = field(default_factory=list)
    layer_shapes: list[LayerShape] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        s = self.settings
        lines = [
            f"{self.path}",
            f"  quantization : bits={s['bits']} group_size={s['group_size']} sym={s['sym']} "
            f"desc_act={s['desc_act']} format={s['checkpoint_format']} lm_head={s['lm_head']}",
        ]
        if s["dynamic"]:
            lines.append(f"  dynamic      : {len(s['dynamic'])} override(s): " + ", ".join(s["dynamic"]))
        lines += [
            f"  layers       : {self.quantized_layers} quantized, {self.plain_tensors} plain tensors",
            "  per setting  : " + ", ".join(f"{k}: {v}" for k, v in sorted(self.layer_settings.items())),
            f"  size         : {human_bytes(self.stored_bytes)} as stored, {human_bytes(self.fp16_bytes)} as "
            f"FP16 ({self.stored_bytes / max(self.fp16_bytes, 1):.0%})",
            "  modes on this machine:",
        ]
        for m in self.modes:
            mark = "yes" if m.runnable else "no "
            lines.append(f"    [{mark}] {m.name:<12} {m.why}")
        lines.append("  backend per layer shape (K -> N):")
        for sh in self.layer_shapes:
            where = [f"CPU: {_backend_text(sh.cpu_backend, sh.cpu_why, 'cpu')}"]
            if sh.npu_backend is not None:
                where.append(f"NPU: {_backend_text(sh.npu_backend, sh.npu_why, 'npu')}")
            lines.append(f"    {sh.setting:<22} {sh.in_features:>6} -> {sh.out_features:<6} x{sh.layers:<4} "
                         + "; ".join(where))
        return "\n".join(lines)


def _backend_text(name: str, why: str, device: str) -> str:
    from .ops import PREFERENCE

    return name if name == PREFERENCE[device][0] else why  # why names the backend and what it skipped


def _spec_label(spec: fmt.QuantSpec) -> str:
    label = f"{spec.bits}-bit g{spec.group_size} {'sym' if spec.sym else 'asym'}"
    return label + (" act-order" if spec.desc_act else "")


def inspect_checkpoint(src: str | Path, allow_pickle: bool = False) -> Inspection:
    src = Path(src)
    config = fmt.GPTQConfig.load(src)
    ckpt = Checkpoint.open(src, allow_pickle=allow_pickle)
    layers = ckpt.quantized_layers()
    quant_names = {f"{p}.{s}" for p, parts in layers.items() for s in parts if s != "bias"}
    stored = fp16 = 0
    for name in ckpt.names():
        st_dtype, _ = ckpt.meta(name)
        stored += ckpt.nbytes(name)
        if name not in quant_names:
            fp16 += ckpt.nbytes(name) // ST_ITEMSIZE[st_dtype] * 2
    per_setting: Counter[str] = Counter()
    shapes: list[tuple[fmt.QuantSpec, int, int]] = []
    for prefix in layers:
        spec = config.spec_for(prefix) or config.default
        per_setting[_spec_label(spec)] += 1
        _, qshape = ckpt.meta(f"{prefix}.qweight")
        k = fmt.check_layer_shapes(prefix, layer_metas(ckpt, prefix, layers[prefix]), spec)
        fp16 += 2 * k * qshape[1]
        shapes.append((spec, k, qshape[1]))
    d = config.default
    settings = {"bits": d.bits, "group_size": d.group_size, "sym": d.sym, "desc_act": d.desc_act,
                "checkpoint_format": d.checkpoint_format, "lm_head": config.lm_head,
                "dynamic": [("-:" if not q else "+:") + p for p, q, _ in config.dynamic]}
    info = Inspection(str(src), settings, len(layers), len(ckpt.names()) - len(quant_names),
                      dict(per_setting), stored, fp16)
    info.layer_shapes = backends_per_shape(shapes)
    info.modes = available_modes(info.layer_shapes)
    return info


def _choice(device: str, spec: fmt.QuantSpec, k: int, n: int) -> tuple[str, str]:
    from .errors import BackendError
    from .ops import choose_backend

    try:
        backend, why = choose_backend(device, spec, k, n)
    except BackendError as e:
        return "none", str(e)
    return backend.name, why


def backends_per_shape(shapes: list[tuple[fmt.QuantSpec, int, int]]) -> list[LayerShape]:
    """Group layers by (setting, K, N), in checkpoint order, with the backend each device would use."""
    count: Counter[tuple[fmt.QuantSpec, int, int]] = Counter(shapes)
    on_npu = importlib.util.find_spec("torch_npu") is not None
    out = []
    for spec, k, n in count:  # a Counter keeps first-seen order
        cpu, cpu_why = _choice("cpu", spec, k, n)
        npu, npu_why = _choice("npu", spec, k, n) if on_npu else (None, "")
        out.append(LayerShape(_spec_label(spec), k, n, count[(spec, k, n)], cpu, cpu_why, npu, npu_why))
    return out


def available_modes(shapes: list[LayerShape]) -> list[Mode]:
    """Which modes can run a checkpoint with these layers on this machine, and why not."""
    from .ops import backends

    modes = [Mode("offline", True, "`gptq-ascend convert` runs anywhere (pure torch)")]
    have_vllm = importlib.util.find_spec("vllm") is not None
    registry = backends()
    cpu = registry.get("cpu")
    if not have_vllm:
        modes.append(Mode("online CPU", False, "vllm is not installed in this environment"))
    else:
        cpu_ok, why = cpu.available() if cpu else (False, "the CPU kernel is not part of this install")
        slow = sum(sh.layers for sh in shapes if cpu_ok and sh.cpu_backend != "cpu")
        if cpu_ok and not slow:
            modes.append(Mode("online CPU", True, "vLLM + the fused C++ kernel"))
        elif cpu_ok:
            modes.append(Mode("online CPU", True, f"vLLM; {slow} layer(s) fall back to the reference "
                                                  "dequant (slow)"))
        else:
            modes.append(Mode("online CPU", True, f"vLLM with the reference backend only (slow): {why}"))
    if importlib.util.find_spec("torch_npu") is None:
        modes.append(Mode("online NPU", False, "torch_npu is not installed (no Ascend NPU stack here)"))
    else:
        npu = registry.get("npu")
        ok, why = npu.available() if npu else (False, "the NPU backend is not part of this install")
        modes.append(Mode("online NPU", ok, why or "vLLM-Ascend + torch_npu"))
    return modes
