"""On-policy distillation (GKD, Agarwal et al. 2024): the student learns on its own samples.

With probability ``lam`` a batch is replaced by the student's sampled completions of its prompts;
the teacher then scores those very tokens and the divergence (usually the generalized JSD) is taken
on the generated positions only. Sampling is seeded by (seed, step), so a resumed run draws the same
completions as an uninterrupted one.
"""

from __future__ import annotations

import random

import torch


class OnPolicyBatches:
    def __init__(self, student: torch.nn.Module, cfg, *, seed: int = 0, pad_token_id: int = 0,
                 eos_token_id: int | None = None):
        self.student = student
        self.cfg = cfg
        self.seed = seed
        self.pad = pad_token_id
        self.eos = eos_token_id

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
        was_training = self.student.training
        self.student.eval()
        with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + step)
            out = self.student.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                        temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                        max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad,
                                        eos_token_id=self.eos)
        self.student.train(was_training)
        generated = out[:, prompts.shape[1]:]
        # Positions after a sequence's first EOS are padding: neither attended to nor scored.
        alive = torch.ones_like(generated, dtype=torch.bool)
        if self.eos is not None:
            ended = (generated == self.eos).int().cumsum(-1)
            alive = (ended == 0) | ((ended == 1) & (generated == self.eos))
        attn = torch.cat([torch.ones_like(prompts), alive.long()], dim=1)
        labels = torch.cat([torch.full_like(prompts, -100), generated.masked_fill(~alive, -100)], dim=1)
        new = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "loss_mask")}
        new.update(input_ids=out, attention_mask=attn, labels=labels)
        new.pop("example_ids", None)  # a stored teacher cannot score new tokens: on-policy needs a live one
        return new
