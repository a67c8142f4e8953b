"""SmolLM2-135M-Instruct (and an adapter) behind an OpenAI-style HTTP endpoint, started in this process.

    python examples/serve.py [ADAPTER]          # e.g. runs/lora from examples/lora.py; MINICUSTOM_SMOKE=1: seconds

Starts the server of `minicustom serve` on a free local port in a thread, sends the held-out sentiment reviews
to /v1/chat/completions with urllib (temperature 0: greedy), scores the replies with the task's scorer and
compares them with the same questions answered in process: one model, one greedy decoder, the same answers.
Prints the first request and its reply, saves every exchange as JSONL, and stops the server. An OpenAI
client works the same way: OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused").
Implementation: minicustom/serve.py
"""

import json
import sys
import threading
from urllib.request import Request, urlopen

from common import accuracy, held_out, model_path, out_dir, report, size

import minicustom as mc
from minicustom.evaluate import label_accuracy
from minicustom.serve import Engine, make_server

ADAPTER = sys.argv[1] if len(sys.argv) > 1 else None  # an adapter folder, or None: the model alone
MODEL = model_path()
TASK = held_out("sentiment", n_test=size(20, 3))
OUT = out_dir("serve")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
if ADAPTER:
    mc.load_adapter(model, ADAPTER)
in_process = accuracy(model, tok, TASK)
server = make_server(Engine(model, tok, "smollm2"), host="127.0.0.1", port=0)  # port 0: any free port
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
exchanges = []
for record in TASK.test:  # the record's system and user turns; its assistant turn is the reference
    body = {"model": "smollm2", "messages": record["messages"][:-1], "temperature": 0,
            "max_tokens": TASK.max_new_tokens}
    with urlopen(Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})) as response:
        exchanges.append({"request": body, "reply": json.load(response)})
server.shutdown()
server.server_close()
answers = [e["reply"]["choices"][0]["message"]["content"] for e in exchanges]
over_http = sum(label_accuracy(a, r["answer"], TASK.labels) for a, r in zip(answers, TASK.test)) / len(answers)
same = sum(a.strip() == r["output"].strip() for a, r in zip(answers, in_process.records))
print(f"{url}: {same} of {len(answers)} answers identical to the in-process ones\nrequest: "
      f"{json.dumps(exchanges[0]['request'])}\nreply:   {json.dumps(exchanges[0]['reply'])}")
OUT.mkdir(parents=True)
(OUT / "exchanges.jsonl").write_text("".join(json.dumps(e) + "\n" for e in exchanges))
report("accuracy", in_process, over_http, None, OUT / "exchanges.jsonl", labels=("in process", "over HTTP"),
       sample=f"{TASK.test[0]['messages'][-2]['content']!r} -> {answers[0]!r}")
