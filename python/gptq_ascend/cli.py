"""The `gptq-ascend` command line (also `python -m gptq_ascend`): every command's arguments, and the
one way errors and interrupts end a command. The work itself is in convert.py, inspection.py and
verify.py."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import interrupts
from .errors import GPTQAscendError

# Each command: its one-line summary (in `gptq-ascend --help`) and its description (`gptq-ascend CMD --help`).
_COMMANDS = {
    "convert": ("write an exactly dequantized FP16/BF16 checkpoint that any vLLM loads without flags",
                "Dequantize every GPTQ layer of SRC (W = (q - z) * scale, the GPTQ definition) and write a "
                "plain Hugging Face checkpoint to DST. The output is built in a temporary folder beside DST "
                "and moved into place only when complete."),
    "inspect": ("show a GPTQ checkpoint's settings, sizes, and which modes can run it here",
                "Print the quantization settings, the number of quantized layers and plain tensors, the size "
                "as stored and as FP16, and whether online CPU, online NPU and offline modes can run this "
                "checkpoint on this machine (with the reason when not)."),
    "verify": ("compare a candidate model's behaviour with a reference (norms, top-1, KL, perplexity)",
               "REFERENCE is the unquantized model or the GPTQ checkpoint; CANDIDATE is a converted checkpoint "
               "or a GPTQ checkpoint (run online through the op backends). Exit status 0 only when every "
               "threshold holds."),
}


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="GPTQ checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", help="output folder; must not exist unless --force")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="dtype of every floating-point tensor in the output (default: float16; use "
                        "bfloat16 when a dequantized value would overflow float16)")
    p.add_argument("--max-shard-size", default="50GB",
                   help="largest safetensors shard, e.g. 5GB or 500MB (default: 50GB, as transformers)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--verify", action="store_true",
                   help="re-read the output and compare every tensor with the reference dequant; "
                        "exit non-zero (and write nothing) on any mismatch")
    p.add_argument("--backend", default="reference",
                   help="dequantize with this ops backend: reference (default, pure torch), cpu (the C++ "
                        "kernel) or npu (on an Ascend device)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickle .bin checkpoints, with torch.load(weights_only=True)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: only when stderr is a terminal)")
    p.set_defaults(run=_run_convert)


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="GPTQ checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--allow-pickle", action="store_true", help="also read pickle .bin checkpoints")
    p.set_defaults(run=_run_inspect)


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    from .verify import DEFAULT_THRESHOLDS, run

    p.add_argument("reference", help="reference model folder")
    p.add_argument("candidate", help="candidate model folder")
    p.add_argument("--text", type=Path, help="held-out text file (default: heldout.txt beside a model, "
                                             "else Python's own pydoc topics)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk (default 128)")
    p.add_argument("--max-chunks", type=int, default=8, help="chunks of text to compare (default 8)")
    p.add_argument("--backend", default=None, help="op backend for GPTQ layers (default: best available)")
    for key, value in DEFAULT_THRESHOLDS.items():
        p.add_argument("--" + key.replace("_", "-"), type=float, default=value,
                       help=f"threshold (default {value})")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptq-ascend",
        description="GPTQ checkpoints on vLLM for Ascend NPUs and CPUs. Online mode is the vLLM plugin "
                    "(`vllm serve MODEL --quantization gptq_ascend`); these commands cover offline mode "
                    "and inspection.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = [("convert", _convert_arguments), ("inspect", _inspect_arguments)]
    try:
        from . import verify  # noqa: F401  (it needs torch; convert and inspect parse without it)
    except ImportError:
        pass
    else:
        commands.append(("verify", _verify_arguments))
    for name, add_arguments in commands:
        summary, description = _COMMANDS[name]
        add_arguments(sub.add_parser(name, help=summary, description=description))
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    from .convert import backend_dequant, convert, reference_dequant
    from .units import human_bytes

    dequant = reference_dequant if args.backend == "reference" else backend_dequant(args.backend)
    result = convert(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     force=args.force, verify=args.verify, allow_pickle=args.allow_pickle,
                     progress=args.progress, dequant_fn=dequant)
    print(f"wrote {result.dst}: {result.tensors} tensors ({result.quantized_layers} dequantized layers) in "
          f"{result.shards} shard(s), {human_bytes(result.bytes_written)}, dtype {args.dtype}")
    if result.verify is not None:
        print(result.verify.summary())
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_checkpoint

    info = inspect_checkpoint(args.src, allow_pickle=args.allow_pickle)
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    interrupts.install_handlers()
    try:
        return args.run(args)
    except (KeyboardInterrupt, Exception) as e:
        if isinstance(e, KeyboardInterrupt) or interrupts.interrupted():
            print(f"gptq-ascend {args.command}: interrupted; nothing was written", file=sys.stderr)
            return 130
        if isinstance(e, GPTQAscendError):
            print(f"gptq-ascend {args.command}: error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, OSError):  # a read or write the commands did not expect to fail
            where = f"{e.filename}: " if e.filename else ""
            print(f"gptq-ascend {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
            return 1
        if isinstance(e, MemoryError):
            print(f"gptq-ascend {args.command}: error: out of memory", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
