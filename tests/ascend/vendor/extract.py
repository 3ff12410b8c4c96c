"""Extract the few vendor passages gptq-ascend depends on from the torch_npu wheel and vLLM-Ascend sdists.

    python tests/ascend/vendor/extract.py --torch-npu WHEEL --vllm-ascend SDIST [SDIST ...] [--check]

Writes (or, with ``--check``, compares against) ``tests/ascend/vendor/<package>-<version>/``: verbatim
excerpts -- whole top-level definitions or statements, cut by the ``ast`` module, or whole YAML entries
-- each headed by the source file, its sha256 and line range, plus ``SOURCES.json`` naming the archive
and its sha256. tests/ascend/test_vendor_contract.py reads only these excerpts; when the archives are
present (``GPTQ_ASCEND_VENDOR_DIR``), it re-runs this extraction and requires identical output, so the
committed copies are provably the vendor's text. Get the archives with the ordinary clients:
``pip download --no-deps torch_npu==2.13.0 -d DIR`` and the vllm-ascend sdists from PyPI.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# torch_npu: the ops we call (gptq_ascend/backends/ascend/fused.py).
TORCH_NPU_OPS = ("npu_weight_quant_batchmatmul", "npu_convert_weight_to_int4pack")
TORCH_NPU_FILES = {
    "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml": ("yaml", TORCH_NPU_OPS),
    "torch_npu/op_plugin/meta/_meta_registrations.py": ("py", ("npu_weight_quant_batchmatmul_meta",)),
    "torch_npu/_op_plugin_docs.py": ("docs", TORCH_NPU_OPS),
    # the torch.npu.* functions we call (device probing, synchronize) must be exported there
    "torch_npu/npu/__init__.py": ("py", ("__all__",)),
}
# vLLM-Ascend: the hooks the plugin relies on (docs/vllm-plugin.md, "vLLM-Ascend"). Names that a version
# lacks are recorded as missing, not an error: the tests decide what must exist.
VLLM_ASCEND_FILES = {
    "vllm_ascend/platform.py": ("py", ("NPUPlatform.supported_quantization", "NPUPlatform.device_type",
                                       "NPUPlatform.verify_quantization")),
    "vllm_ascend/ops/linear.py": ("py", ("AscendLinearBase", "AscendQKVParallelLinear",
                                         "AscendMergedColumnParallelLinear", "AscendRowParallelLinear",
                                         "AscendColumnParallelLinear", "AscendReplicatedLinear")),
    "vllm_ascend/ops/linear_op.py": ("py", ("*reads .weight", "_get_row_parallel_op")),
    "vllm_ascend/ops/weight_prefetch.py": ("py", ("*reads .weight",)),
    "vllm_ascend/ops/vocab_parallel_embedding.py": ("py", ("AscendVocabParallelEmbedding.__init__",
                                                           "AscendParallelLMHead",
                                                           "AscendLogitsProcessor._get_logits_normal",
                                                           "AscendLogitsProcessor._get_logits_lmheadtp")),
    "vllm_ascend/utils.py": ("py", ("matmul_allreduce_enable",)),
    "vllm_ascend/envs.py": ("envs", ("VLLM_ASCEND_ENABLE_MATMUL_ALLREDUCE",)),
    "vllm_ascend/ascend_config.py": ("py", ("*mentions enable_matmul_allreduce",)),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reads_weight(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "weight" for n in ast.walk(node))


def _mentions(node: ast.AST, word: str) -> bool:
    return any((isinstance(n, ast.Attribute) and n.attr == word) or
               (isinstance(n, ast.Constant) and n.value == word) for n in ast.walk(node))


def _segment(lines: list[str], node: ast.AST) -> tuple[int, int, str]:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno, "".join(lines[first - 1:node.end_lineno])


def py_excerpts(text: str, names: tuple[str, ...]) -> list[tuple[str, int, int, str]]:
    """(name, first line, last line, verbatim source) per requested definition.

    ``Class.attr`` picks one statement of a class body; ``*reads .weight`` every top-level function and
    every method that reads an attribute named ``weight``; ``*mentions X`` every method or statement
    naming X (as an attribute or a string)."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    out = []

    def defs(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield node.name, node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        yield t.id, node

    top = dict(defs(tree.body))
    for name in names:
        if name.startswith("*reads") or name.startswith("*mentions"):
            word = name.split()[-1]
            test = _reads_weight if name.startswith("*reads") else (lambda n, w=word: _mentions(n, w))
            whole = name.startswith("*reads")   # whole functions; "*mentions": only the statements
            for node in tree.body:
                funcs = []
                if isinstance(node, ast.ClassDef):
                    funcs = [(f"{node.name}.{item.name}", item) for item in node.body
                             if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    funcs = [(node.name, node)]
                for fname, func in funcs:
                    if whole and test(func):
                        out.append((fname, *_segment(lines, func)))
                    elif not whole:
                        out += [(f"{fname}:{st.lineno}", *_segment(lines, st)) for st in func.body if test(st)]
            continue
        if "." in name:
            cls, attr = name.split(".", 1)
            node = top.get(cls)
            member = dict(defs(node.body)).get(attr) if isinstance(node, ast.ClassDef) else None
            if member is not None:
                out.append((name, *_segment(lines, member)))
            continue
        if name in top:
            out.append((name, *_segment(lines, top[name])))
    return out


def yaml_excerpts(text: str, ops: tuple[str, ...]) -> list[tuple[str, int, int, str]]:
    """Whole ``- ...`` entries of a native_functions-style YAML whose ``func:`` is one of ``ops``."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("- ")] + [len(lines)]
    out = []
    for a, b in zip(starts, starts[1:], strict=False):
        entry = "".join(lines[a:b])
        m = re.search(r"func:\s*([A-Za-z0-9_]+)\(", entry)
        if m and m.group(1) in ops:
            out.append((m.group(1), a + 1, b, entry))
    return out


def docs_excerpts(text: str, ops: tuple[str, ...]) -> list[tuple[str, int, int, str]]:
    """The ``_add_torch_npu_docstr("op", ...)`` calls of _op_plugin_docs.py for ``ops``."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    out = []
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "_add_torch_npu_docstr" and call.args
                and isinstance(call.args[0], ast.Constant) and call.args[0].value in ops):
            out.append((call.args[0].value, *_segment(lines, node)))
    return out


def envs_excerpts(text: str, names: tuple[str, ...]) -> list[tuple[str, int, int, str]]:
    """Items of the ``env_variables`` dict in vllm_ascend/envs.py."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value in names:
                    out.append((key.value, key.lineno, value.end_lineno,
                                "".join(lines[key.lineno - 1:value.end_lineno])))
    return out


EXTRACTORS = {"py": py_excerpts, "yaml": yaml_excerpts, "docs": docs_excerpts, "envs": envs_excerpts}


def render(member: str, data: bytes, kind: str, names: tuple[str, ...]) -> str:
    text = data.decode("utf-8")
    found = EXTRACTORS[kind](text, names)
    comment = "#"
    head = [f"{comment} Verbatim excerpts of {member} (sha256 {sha256(data)}), cut by tests/ascend/vendor/extract.py.",
            f"{comment} Requested: {', '.join(names)}",
            f"{comment} Found: {', '.join(name for name, *_ in found) or 'nothing'}"]
    body = []
    for name, first, last, src in found:
        body.append(f"{comment} ---- {name}: lines {first}-{last}\n{src.rstrip()}\n")
    return "\n".join(head) + "\n\n" + "\n".join(body)


def excerpt_name(member: str) -> str:
    return f"{Path(member).name}.excerpt"   # not *.py: the excerpts are not modules (nor linted)


def read_archive(path: Path) -> tuple[str, str, dict[str, bytes]]:
    """(package, version, {member path inside the package: bytes}) for a wheel or an sdist."""
    if path.suffix == ".whl":
        package, version = path.name.split("-")[:2]
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist() if n in TORCH_NPU_FILES}
            files.update({n: z.read(n) for n in z.namelist() if n.endswith("dist-info/licenses/LICENSE")})
        return package, version, files
    m = re.match(r"(.+)-([0-9][^-]*)\.tar\.gz$", path.name)
    if not m:
        raise SystemExit(f"{path}: expected a .whl or NAME-VERSION.tar.gz")
    package, version = m.group(1), m.group(2)
    files = {}
    with tarfile.open(path) as t:
        for info in t.getmembers():
            rel = info.name.split("/", 1)[1] if "/" in info.name else info.name
            if rel in VLLM_ASCEND_FILES or rel == "LICENSE":
                files[rel] = t.extractfile(info).read()
    return package, version, files


def build(path: Path) -> dict[str, str]:
    """{relative output path: content} for one archive."""
    package, version, files = read_archive(path)
    wanted = TORCH_NPU_FILES if path.suffix == ".whl" else VLLM_ASCEND_FILES
    outdir = f"{package.replace('_', '-')}-{version}"
    out: dict[str, str] = {}
    sources = {"archive": path.name, "archive_sha256": sha256(path.read_bytes()), "files": {}}
    for member, (kind, names) in wanted.items():
        if member not in files:
            sources["files"][member] = None
            continue
        out[f"{outdir}/{excerpt_name(member)}"] = render(member, files[member], kind, names)
        sources["files"][member] = sha256(files[member])
    for member, data in files.items():
        if member.endswith("LICENSE"):
            out[f"{outdir}/LICENSE"] = data.decode("utf-8")
    out[f"{outdir}/SOURCES.json"] = json.dumps(sources, indent=1, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-npu", type=Path, action="append", default=[])
    ap.add_argument("--vllm-ascend", type=Path, nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true", help="compare with the committed excerpts, write nothing")
    args = ap.parse_args(argv)
    bad = []
    for archive in [*args.torch_npu, *args.vllm_ascend]:
        for rel, content in build(archive).items():
            target = args.out / rel
            if args.check:
                if not target.exists() or target.read_bytes() != content.encode("utf-8"):
                    bad.append(rel)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content.encode("utf-8"))
    if bad:
        print("differs from the archive: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
