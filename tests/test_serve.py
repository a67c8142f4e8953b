"""`minicustom serve` with the real `openai` client: answers equal to `minicustom generate`, streaming, usage,
stop strings, OpenAI-shaped errors, a bounded queue, and a 200-request load test."""

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from minicustom import load_model, load_tokenizer
from minicustom.cli import main
from minicustom.serve import Engine, make_server

openai = pytest.importorskip("openai")


class Server:
    def __init__(self, model, tok, name="tiny", **options):
        self.engine = Engine(model, tok, name, **options)
        self.http = make_server(self.engine, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, path, body: bytes, headers=None):
        """(status, parsed JSON) of a raw POST."""
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def server(setup):
    s = Server(load_model(setup[1]), load_tokenizer(setup[1]))
    yield s
    s.close()


def generated(capsys, path, prompt, n, system=None):
    """What `minicustom generate` prints for the prompt, greedy, n new tokens at most."""
    capsys.readouterr()
    main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", str(n),
          *(["--system", system] if system else [])])
    return capsys.readouterr().out.removesuffix("\n")


def test_chat_equals_generate_and_streams_the_same(server, setup, capsys, tok):
    expected = generated(capsys, setup[1], "Where is Paris?", 12)
    chat = [{"role": "user", "content": "Where is Paris?"}]
    r = server.client.chat.completions.create(model="tiny", messages=chat, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    prompt = len(tok.apply_chat_template(chat, add_generation_prompt=True))
    assert r.usage.prompt_tokens == prompt and r.usage.total_tokens == prompt + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 12
    stream = server.client.chat.completions.create(model="tiny", messages=chat, temperature=0, max_tokens=12,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert server.client.models.list().data[0].id == "tiny"


def test_completions_stop_strings_and_sampling(server, tok, model):
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    greedy = tok.decode(model.generate([ids], max_new_tokens=10)[0, len(ids):].tolist(), skip_special_tokens=True)
    r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == greedy and r.usage.prompt_tokens == len(ids)
    stop = greedy[3:5]
    cut = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stop=stop,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    a, b = (server.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9,
                                             seed=s).choices[0].text for s in (1, 1))
    assert a == b  # the seed fixes the sample


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
])
def test_bad_requests_get_openais_400(server, body, param):
    status, reply = server.post("/v1/chat/completions", json.dumps({"model": "tiny", **body}).encode())
    assert status == 400 and reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in reply["error"]["message"]


def test_errors_through_the_client_and_raw(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.status_code == 400 and "role" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert server.post("/v1/chat/completions", b"{not json")[0] == 400
    assert server.post("/v1/chat/completions", b"[1, 2]")[0] == 400
    assert server.post("/v1/nothing", b"{}")[0] == 404
    status, reply = server.post("/v1/completions", b"x" * (2 << 20))
    assert status == 413 and "at most" in reply["error"]["message"]


def test_a_full_queue_answers_503(setup):
    s = Server(load_model(setup[1]), load_tokenizer(setup[1]), queue_size=1)
    started, gate, run = threading.Event(), threading.Event(), s.engine._run
    s.engine._run = lambda job: (started.set(), gate.wait(60), run(job))
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(s.post, "/v1/completions", body)
            assert started.wait(30)  # the worker holds the first request
            second = pool.submit(s.post, "/v1/completions", body)  # waits in the queue (length 1)
            deadline = time.monotonic() + 30
            while not s.engine.jobs.qsize() and time.monotonic() < deadline:
                time.sleep(0.01)
            status, reply = s.post("/v1/completions", body)
            assert status == 503 and reply["error"]["code"] == "busy"
            gate.set()
            assert first.result()[0] == second.result()[0] == 200
    finally:
        gate.set()
        s.close()


def test_200_requests_from_8_threads(server, capsys):
    def one(i):
        t0 = time.perf_counter()
        r = server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Name city {i}."}], max_tokens=4, temperature=0.7,
            seed=i)
        assert r.choices[0].finish_reason in ("stop", "length")
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        latencies = sorted(pool.map(one, range(200)))
    wall = time.perf_counter() - t0
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    with capsys.disabled():
        print(f"\n200 chat requests, 8 threads, tiny model: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
              f"{200 / wall:.1f} requests/s")
    assert len(latencies) == 200


@pytest.mark.real_model
@pytest.mark.slow
def test_the_demo_model_answers_through_the_openai_client(capsys):
    from minicustom.cli_common import demo_model

    path = demo_model()
    question = "What is the capital of France?"
    expected = generated(capsys, path, question, 24)
    s = Server(load_model(path), load_tokenizer(path), name="smollm2")
    try:
        chat = [{"role": "user", "content": question}]
        r = s.client.chat.completions.create(model="smollm2", messages=chat, temperature=0, max_tokens=24)
        assert r.choices[0].message.content == expected and "Paris" in expected
        stream = s.client.chat.completions.create(model="smollm2", messages=chat, temperature=0, max_tokens=24,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    finally:
        s.close()
