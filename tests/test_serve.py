"""`python -m lora_app serve`: the OpenAI client gets mlx-lm's greedy tokens from it, it lists its models without a
Hugging Face cache, it answers only its own Host and Origin (and key), and base and adapter share one copy of the
weights."""

from __future__ import annotations

import http.client
import json
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora_app import serve

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "the red cat sat on the mat ."}]


def start_serve(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`python -m lora_app serve ARGS --port 0`; (process, base URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_app", "serve", *args, "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not select.select([proc.stdout], [], [], 0.2)[0]:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "serve did not start"
    line = proc.stdout.readline().decode()
    assert line.startswith("serving http://127.0.0.1:"), line + proc.stderr.read().decode()
    return proc, line.split()[1]


@pytest.fixture(scope="module")
def served(tiny_model, tiny_adapter, engine_env, tmp_path_factory):
    """serve with the tiny model and adapter, and no Hugging Face cache folder (HF_HUB_CACHE names a missing one)."""
    missing = tmp_path_factory.mktemp("hf") / "no-such-cache"
    proc, url = start_serve(["--model", str(tiny_model), "--adapter", f"tuned={tiny_adapter}"],
                            {**engine_env, "HF_HUB_CACHE": str(missing), "HF_HOME": str(missing)})
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def request(url: str, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    where = url.removeprefix("http://").split("/")[0]
    conn = http.client.HTTPConnection(where, timeout=60)
    conn.request(method, path, json.dumps(body) if body is not None else None,
                 {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read().decode()


def mlx_lm_greedy(model: Path, adapter: Path | None, max_tokens: int) -> tuple[list[int], str]:
    """mlx-lm's own loader and generator, greedy, on the chat template's prompt (as `mlx_lm.generate` builds it):
    the tokens, and the text as it streams them."""
    from mlx_lm import load, stream_generate

    mlx_model, tokenizer = load(str(model), adapter_path=str(adapter) if adapter else None)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    out = [r for r in stream_generate(mlx_model, tokenizer, prompt, max_tokens=max_tokens)]
    return [r.token for r in out if r.finish_reason != "stop"], "".join(r.text for r in out)


def test_openai_client_streams_the_adapters_greedy_tokens(served, tiny_model, tiny_adapter):
    """Streamed: the same text, token for token as mlx-lm streams it, and the same count; not streamed (where the
    server can return token ids, with logprobs): the same ids."""
    from openai import OpenAI

    client = OpenAI(base_url=served, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["base", "tuned"]
    answers = {}
    for model_id, adapter in (("tuned", tiny_adapter), ("base", None)):
        stream = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=24, temperature=0.0,
                                                stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in stream:
            pieces += [c.delta.content for c in chunk.choices if c.delta.content]
            usage = chunk.usage or usage
        whole = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=24, temperature=0.0,
                                               logprobs=True)
        ids = [t.model_extra["id"] for t in whole.choices[0].logprobs.content]
        tokens, text = mlx_lm_greedy(tiny_model, adapter, 24)
        assert ("".join(pieces), usage.completion_tokens) == (text, len(tokens)), model_id
        assert ids == tokens, model_id
        answers[model_id] = tokens
    assert answers["tuned"] != answers["base"]  # the adapter was applied


def test_models_answers_without_a_hugging_face_cache(served, tmp_path):
    """OpenAI clients list the models first; mlx-lm 0.32.2's server answers that from scan_cache_dir(), which raises
    when the cache folder does not exist yet (a machine that never downloaded a model)."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    with pytest.raises(CacheNotFound):
        scan_cache_dir(tmp_path / "no-such-cache")
    status, body = request(served, "GET", "/v1/models")
    assert status == 200, body
    models = json.loads(body)["data"]
    assert [m["id"] for m in models] == ["base", "tuned"] and models[1]["adapter"].endswith("adapters")


def test_serve_refuses_other_hosts_and_cross_site_origins(served):
    chat = {"model": "base", "messages": MESSAGES, "max_tokens": 2}
    status, body = request(served, "GET", "/v1/models", headers={"Host": "attacker.example:8080"})
    assert status == 403 and "DNS-rebinding" in body
    status, body = request(served, "POST", "/v1/chat/completions", chat, {"Host": "attacker.example"})
    assert status == 403
    status, body = request(served, "POST", "/v1/chat/completions", chat, {"Origin": "http://attacker.example"})
    assert status == 403 and "attacker.example" in body
    status, body = request(served, "POST", "/v1/chat/completions", chat, {"Origin": "null"})
    assert status == 403
    port = served.split(":")[2].split("/")[0]
    status, body = request(served, "POST", "/v1/chat/completions", chat,
                           {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})
    assert status == 200, body
    assert "access-control-allow-origin" not in body.lower()


def test_serve_loads_nothing_a_request_names(served, tmp_path):
    """mlx-lm's server loads any model path, hub repo or adapter path a request names; ours serves its ids only."""
    for body in ({"model": str(tmp_path)}, {"model": "org/some-repo"}, {"model": "base", "adapters": str(tmp_path)},
                 {"model": "base", "max_tokens": 10**9}):
        status, text = request(served, "POST", "/v1/chat/completions", {"messages": MESSAGES, **body})
        assert status == 400, (body, text)


def test_api_key_and_exposure(tiny_model, tiny_adapter, capfd, monkeypatch):
    """A key is asked for as a bearer token; serving beyond this machine without one is refused (exit 2)."""
    from runhelp import cli_in_process

    plan = serve.plan(str(tiny_model), [str(tiny_adapter)])
    assert plan.ids == ["base", tiny_adapter.parent.name]
    httpd, generator = serve.make_server(plan, "127.0.0.1", 0, api_key="s3cret")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = serve.url_of(httpd)
        assert request(url, "GET", "/v1/models")[0] == 401
        assert request(url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, body = request(url, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and json.loads(body)["data"][0]["id"] == "base"
    finally:
        httpd.shutdown()
        httpd.server_close()
        generator.stop_and_join()
    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    done = cli_in_process(["serve", "--model", str(tiny_model), "--host", "0.0.0.0"], capfd, monkeypatch)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--api-key" in done.stderr, done.stderr


def test_base_and_adapter_share_the_weights(tiny_model, tiny_adapter):
    """load_served: the base answers as a fresh load, the adapter as mlx-lm's loader with --adapter-path, and the
    adapter's model holds the base's weight arrays, not a copy."""
    import mlx.core as mx
    from mlx_lm import load

    models = serve.load_served(serve.plan(str(tiny_model), [f"tuned={tiny_adapter}"]))
    tokens = mx.array([[5, 6, 7, 8, 9, 10]])
    fresh, _ = load(str(tiny_model))
    with_adapter, _ = load(str(tiny_model), adapter_path=str(tiny_adapter))
    base, tuned = models["base"][0], models["tuned"][0]
    assert mx.array_equal(base(tokens), fresh(tokens))
    assert mx.array_equal(tuned(tokens), with_adapter(tokens))
    assert tuned.model.layers[0].self_attn.q_proj.linear.weight is base.model.layers[0].self_attn.q_proj.weight


def test_a_model_without_a_chat_template_gets_plain_turns(tiny_model, tmp_path):
    """No template of its own: 'User:/Assistant:' turns, and the next 'User:' ends the answer (a stop string)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_model.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for f in ("chat_template.jinja", "chat_template.json"):
        (bare / f).unlink(missing_ok=True)
    assert serve.model_has_chat_template(bare) is False and serve.model_has_chat_template(tiny_model) is True
    plan = serve.plan(str(bare), [])
    assert plan.template == "plain" and plan.stop == ["\nUser:"]
    tokenizer = serve.load_served(plan)["base"][1]
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "Be brief.\n\nUser: the red cat sat on the mat .\nAssistant:"
    assert serve.plan(str(tiny_model), [], "chatml").stop == ["<|im_end|>"]
