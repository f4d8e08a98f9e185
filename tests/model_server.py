"""A small vLLM-like OpenAI-compatible server over a real transformers model, on loopback.

- ``POST /v1/completions`` with ``prompt_logprobs``: scores the prompts as vLLM does (entry 0 null,
  the actual prompt token added even outside the top-k) plus one generated step; a served teacher.
- ``POST /v1/completions`` without: samples completions of the token-id prompts with the request's
  seed (the same computation as the student's own ``generate``); ``token_ids`` per choice, or, with
  ``token_ids_field=False``, only ``logprobs.tokens`` keyed ``token_id:N`` without the EOS.
- ``POST /collective_rpc {"method": "reload_weights"}``: reloads the model from its folder (vLLM's
  dev-mode endpoint), counted in ``reloads``; ``POST /reset_prefix_cache`` is counted in ``cache_resets``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


class ServerState:
    def __init__(self, model=None, model_dir: Path | None = None, name: str = "tiny", token_ids_field: bool = True):
        self.model, self.model_dir, self.name, self.token_ids_field = model, model_dir, name, token_ids_field
        self.reloads, self.cache_resets, self.url = 0, 0, ""
        self.lock = threading.Lock()
        if model is None and model_dir is not None:
            self.reload()

    def reload(self) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()


class Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st = self.state
        with st.lock:
            if self.path == "/collective_rpc":
                if body.get("method") != "reload_weights" or st.model_dir is None:
                    return self._send(400, {"error": f"unknown method {body.get('method')!r}"})
                st.reload()
                st.reloads += 1
                return self._send(200, {"results": [None]})
            if self.path == "/reset_prefix_cache":
                st.cache_resets += 1
                return self._send(200, {})
            if self.path != "/v1/completions":
                return self._send(404, {"error": f"no route {self.path}"})
            if body.get("model") != st.name:
                return self._send(404, {"error": "model not found"})
            choices = self._score(body) if "prompt_logprobs" in body else self._sample(body)
        self._send(200, {"object": "text_completion", "choices": choices[::-1]})  # any order

    def _score(self, body: dict) -> list[dict]:
        k = body["prompt_logprobs"]
        choices = []
        for n, prompt in enumerate(body["prompt"]):
            with torch.no_grad():
                logp = torch.log_softmax(self.state.model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
            prompt_lp = [None]
            for t in range(1, len(prompt)):
                row = logp[t - 1]
                vals, ids = row.topk(k)
                entry = {str(int(i)): {"logprob": float(v), "rank": r + 1} for r, (v, i) in enumerate(zip(vals, ids))}
                actual = prompt[t]  # servers add the prompt token itself, even outside the top-k
                entry[str(actual)] = {"logprob": float(row[actual]), "rank": int((row > row[actual]).sum()) + 1}
                prompt_lp.append(entry)
            vals, ids = logp[-1].topk(k)
            last = {f"token_id:{int(i)}": float(v) for v, i in zip(vals, ids)}
            choices.append({"index": n, "text": "", "prompt_logprobs": prompt_lp,
                            "logprobs": {"top_logprobs": [last], "tokens": [f"token_id:{int(ids[0])}"]}})
        return choices

    def _sample(self, body: dict) -> list[dict]:
        model = self.state.model
        eos = model.generation_config.eos_token_id
        prompts = torch.tensor(body["prompt"])
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(body["seed"])
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 temperature=body["temperature"], top_p=body["top_p"],
                                 max_new_tokens=body["max_tokens"], pad_token_id=0, eos_token_id=eos)
        choices = []
        for n, row in enumerate(out[:, prompts.shape[1]:].tolist()):
            stopped = eos is not None and eos in row
            ids = row[: row.index(eos) + 1] if stopped else row
            choice = {"index": n, "text": "", "finish_reason": "stop" if stopped else "length"}
            if self.state.token_ids_field:
                choice["token_ids"] = ids
            else:
                choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in (ids[:-1] if stopped else ids)]}
            choices.append(choice)
        return choices


@contextlib.contextmanager
def serve(model=None, *, model_dir: Path | None = None, name: str = "tiny", token_ids_field: bool = True):
    """Run the server in a thread for the duration of the block; yields its state (``.url``, ``.reloads``)."""
    state = ServerState(model, model_dir, name, token_ids_field)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Handler,), {"state": state}))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
