"""On-policy distillation (GKD, Agarwal et al. 2024): the student learns on its own samples.

With probability ``lam`` a batch is replaced by the student's sampled completions of its prompts;
the teacher then scores those very tokens and the divergence (usually the generalized JSD) is taken
on the generated positions only. Sampling is seeded by (seed, step), so a resumed run draws the same
completions as an uninterrupted one.

The samples come from the student in this process (transformers ``generate``), or from a copy of
it that an OpenAI-compatible server (``vllm serve``) or vLLM's engine holds: before the copy
samples, it is brought up to date by writing the student to its folder and having it reload.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from distillery.http import ServerError, post_json
from distillery.io import save_model_folder
from distillery.signals.served import parse_token_id
from distillery.train.distributed import full_state_dict, is_sharded


class TransformersSampler:
    """The student's own ``generate``, batched, in this process: always in step, nothing to sync."""

    def __init__(self, student: torch.nn.Module, cfg, *, pad_token_id: int = 0, eos_token_id: int | None = None):
        self.student, self.cfg, self.pad, self.eos = student, cfg, pad_token_id, eos_token_id

    def sync(self, step: int) -> None:
        pass

    def _static(self, prompts: torch.Tensor) -> bool:
        # On a GPU transformers compiles decoding with a static cache (CUDA graphs): per-token launch
        # overhead, which dominates a small student's sampling, mostly goes away.
        # auto leaves a sharded student alone: its forward is a collective, not a graph to capture.
        return self.cfg.kv_cache == "static" or (self.cfg.kv_cache == "auto" and prompts.device.type == "cuda"
                                                 and not is_sharded(self.student))

    @torch.no_grad()
    def __call__(self, prompts: torch.Tensor, seed: int) -> list[list[int]]:
        was_training = self.student.training
        self.student.eval()
        with torch.random.fork_rng(devices=[prompts.device] if prompts.device.type == "cuda" else []):
            torch.manual_seed(seed)
            # A sharded (FSDP2) student's forward is a collective: synced_gpus keeps every rank stepping
            # until all ranks' sequences are done, so none waits on a rank that stopped early.
            out = self.student.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                        temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                        max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad,
                                        eos_token_id=self.eos, synced_gpus=is_sharded(self.student),
                                        **({"cache_implementation": "static"} if self._static(prompts) else {}))
        self.student.train(was_training)
        return [until_eos(row, self.eos) for row in out[:, prompts.shape[1]:].tolist()]


def until_eos(tokens: list[int], eos: int | None) -> list[int]:
    """A completion up to and including its first EOS (what follows is padding)."""
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


class SyncedSampler:
    """Samples from a copy of the student that lives elsewhere (a server, vLLM's engine). Before it
    samples, a copy ``sync_every`` or more steps old is brought up to date. The student is written to
    ``sync_dir`` one file at a time with atomic renames, then the copy reloads it. A sharded student
    is gathered first (every rank joins); rank 0 writes, and ranks wait for each other."""

    def __init__(self, student: torch.nn.Module, cfg, sync_dir: Path, *, eos_token_id: int | None = None,
                 tokenizer=None, rank: int = 0, barrier=None):
        self.student, self.cfg, self.sync_dir = student, cfg, Path(sync_dir)
        self.eos, self.tokenizer, self.rank, self.barrier = eos_token_id, tokenizer, rank, barrier or (lambda: None)
        self.synced_at: int | None = None
        self.syncs = 0

    def sync(self, step: int) -> None:
        if self.synced_at is not None and step - self.synced_at < self.cfg.sync_every:
            return
        state = full_state_dict(self.student) if is_sharded(self.student) else None  # a collective
        if self.rank == 0:
            write_model_files(self.student, self.sync_dir, self.tokenizer if self.syncs == 0 else None,
                              state_dict=state)
        self.barrier()
        self.reload()
        self.barrier()
        self.synced_at, self.syncs = step, self.syncs + 1

    def reload(self) -> None:
        raise NotImplementedError

    def finish(self, ids: list[int], finish_reason: str | None) -> list[int]:
        """A completion as token ids, ending at its EOS when it stopped on one, so the student learns to stop."""
        ids = [int(t) for t in ids][: self.cfg.max_new_tokens]
        if finish_reason == "stop" and self.eos is not None and (not ids or ids[-1] != self.eos) \
                and len(ids) < self.cfg.max_new_tokens:
            ids.append(self.eos)
        return until_eos(ids, self.eos)


class ServerSampler(SyncedSampler):
    """An OpenAI-compatible ``/v1/completions`` that serves the student, prompts sent as token ids.
    Reload: ``reload_body`` to ``reload_path``, by default vLLM's ``/collective_rpc``
    ``{"method": "reload_weights"}`` (``vllm serve`` offers it under ``VLLM_SERVER_DEV_MODE=1``),
    then a POST to ``reset_cache_path`` so no prefix cache from the old weights is reused."""

    def __init__(self, student: torch.nn.Module, cfg, sync_dir: Path, **kw):
        super().__init__(student, cfg, sync_dir, **kw)
        self.sv = cfg.server
        self.url = self.sv.base_url.rstrip("/")
        self.api_key = self.sv.api_key()

    def reload(self) -> None:
        if self.rank != 0:  # one server: rank 0 speaks for everyone
            return
        hint = " (a vLLM server offers this only when started with VLLM_SERVER_DEV_MODE=1)"
        post_json(self.url + self.sv.reload_path, self.sv.reload_body, api_key=self.api_key,
                  timeout=self.sv.timeout_s, hint=hint)
        if self.sv.reset_cache_path:
            post_json(self.url + self.sv.reset_cache_path, {}, api_key=self.api_key, timeout=self.sv.timeout_s,
                      hint=hint)

    def __call__(self, prompts: torch.Tensor, seed: int) -> list[list[int]]:
        body = {"model": self.sv.model, "prompt": prompts.tolist(), "max_tokens": self.cfg.max_new_tokens,
                "temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "seed": seed, "n": 1,
                "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True,
                "skip_special_tokens": False}
        url = self.url + "/v1/completions"
        answer = post_json(url, body, api_key=self.api_key, timeout=self.sv.timeout_s)
        choices = sorted((answer or {}).get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise ServerError(f"{url}: {len(choices)} choices for {len(prompts)} prompts")
        return [self._tokens(c, url) for c in choices]

    def _tokens(self, choice: dict, url: str) -> list[int]:
        ids = choice.get("token_ids")  # vLLM's return_token_ids
        if ids is None:  # else the sampled tokens of logprobs, keyed "token_id:123"
            tokens = (choice.get("logprobs") or {}).get("tokens")
            if tokens is None:
                raise ServerError(f"{url}: choice {choice.get('index')}: no token ids (needs vLLM's return_token_ids "
                                  "or return_tokens_as_token_ids with logprobs)")
            ids = [parse_token_id(str(t)) for t in tokens]
        return self.finish(ids, choice.get("finish_reason"))


class VLLMSampler(SyncedSampler):
    """vLLM's offline engine in this process (each rank its own), taking ``vllm_gpu_memory`` of the
    GPU. It is started from ``sync_dir`` at the first sync; later syncs reload the weights from there
    (``collective_rpc("reload_weights")``) and reset its prefix cache. Written against vLLM's public
    API but not run here: neither of our machines has vLLM."""

    def __init__(self, student: torch.nn.Module, cfg, sync_dir: Path, **kw):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError("distill.on_policy.generator vllm: the vllm package is not installed (pip install "
                               "vllm, on a machine with a GPU); or use generator: transformers or server") from None
        super().__init__(student, cfg, sync_dir, **kw)
        self.llm = None

    def reload(self) -> None:
        import vllm

        if self.llm is None:
            self.llm = vllm.LLM(model=str(self.sync_dir), gpu_memory_utilization=self.cfg.vllm_gpu_memory, seed=0)
        else:
            self.llm.collective_rpc("reload_weights")
            self.llm.reset_prefix_cache()

    def __call__(self, prompts: torch.Tensor, seed: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(n=1, max_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": row} for row in prompts.tolist()], params, use_tqdm=False)
        return [self.finish(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


def write_model_files(model: torch.nn.Module, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """The student into the folder a sampler serves from, file by file (io.save_model_folder)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per sync would bury the training bar
    try:
        save_model_folder(getattr(model, "module", model), folder, tokenizer, state_dict=state_dict, swap="files")
    finally:
        if bars:
            hf_logging.enable_progress_bar()


class OnPolicyBatches:
    def __init__(self, student: torch.nn.Module, cfg, *, seed: int = 0, pad_token_id: int = 0,
                 eos_token_id: int | None = None, sampler=None):
        self.cfg = cfg
        self.seed = seed
        self.pad = pad_token_id
        self.eos = eos_token_id
        self.sampler = sampler or TransformersSampler(student, cfg, pad_token_id=pad_token_id,
                                                      eos_token_id=eos_token_id)

    def use_student_samples(self, step: int) -> bool:
        return random.Random(self.seed * 7_919 + step).random() < self.cfg.lam

    @torch.no_grad()
    def __call__(self, batch: dict, step: int) -> dict:
        """The batch itself, or one of student completions with ``labels`` on the generated tokens."""
        if not self.use_student_samples(step):
            return batch
        ids = batch["input_ids"]
        if "attention_mask" in batch and not bool(batch["attention_mask"][:, : self.cfg.prompt_tokens].all()):
            raise ValueError("on_policy: prompts (the first prompt_tokens of each example) must not contain padding")
        prompts = ids[:, : self.cfg.prompt_tokens]
        self.sampler.sync(step)
        completions = self.sampler(prompts, self.seed * 1_000_003 + step)
        width = max(1, max(len(c) for c in completions))
        generated = torch.full((len(prompts), width), self.pad, dtype=ids.dtype)
        alive = torch.zeros_like(generated, dtype=torch.bool)
        for b, c in enumerate(completions):
            generated[b, : len(c)] = torch.tensor(c, dtype=ids.dtype)
            alive[b, : len(c)] = True
        generated, alive = generated.to(ids.device), alive.to(ids.device)
        # Positions after a completion's end are padding: neither attended to nor scored.
        attn = torch.cat([torch.ones_like(prompts), alive.long()], dim=1)
        labels = torch.cat([torch.full_like(prompts, -100), generated.masked_fill(~alive, -100)], dim=1)
        new = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "loss_mask")}
        new.update(input_ids=torch.cat([prompts, generated], dim=1), attention_mask=attn, labels=labels)
        new.pop("example_ids", None)  # a stored teacher cannot score new tokens: on-policy needs a live one
        return new
