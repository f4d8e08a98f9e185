"""Token-level divergences between teacher and student distributions, dense or sparse, chunked.

Notation: ``p`` is the teacher's distribution, ``q`` the student's, both at temperature ``T``
(``softmax(logits / T)``). Every divergence is summed over the vocabulary (never averaged over it),
then averaged over the unmasked tokens and multiplied by ``T^2`` (unless ``scale_t2`` is off):

- ``forward_kl``       KL(p || q)        = sum_i p_i (log p_i - log q_i)
- ``reverse_kl``       KL(q || p)
- ``skew_forward_kl``  KL(p || a p + (1-a) q)          (DistiLLM, ``a = skew``)
- ``skew_reverse_kl``  KL(q || a q + (1-a) p)
- ``jsd``              generalized JSD, scaled so it is continuous in ``b = beta`` on [0, 1]:

      JSD_b(p, q) = [ b KL(p || m) + (1-b) KL(q || m) ] / (b (1-b)),   m = b p + (1-b) q

  For small ``b``, ``b KL(p||m) ~ b KL(p||q)`` and ``(1-b) KL(q||m) = O(b^2)``, so the limit at
  ``b -> 0`` is KL(p || q) (forward KL) and, symmetrically, at ``b -> 1`` it is KL(q || p)
  (reverse KL). Those limits are the values used at exactly 0 and 1.
- ``jsd_unscaled``     TRL's ``generalized_jsd_loss``: the numerator above, without the division.
                       It is 0 near both ends yet TRL defines it as forward/reverse KL *at* 0 and
                       1, so it jumps there; offered only for comparison with TRL runs.
- ``tvd``              total variation, 0.5 sum_i |p_i - q_i|
- ``mse``              mean over the vocabulary of (s_i/T - t_i/T)^2 on *logits*; with the T^2 factor
                       this equals the plain logit MSE at any T. Dense teachers only.

Mixtures are taken in probability space (``logaddexp`` of weighted log-probs), never by mixing
log-probs linearly. Math runs in float32 (float64 if the inputs are float64). Vocabulary entries
with -inf logits in the distribution being weighted contribute exactly zero.

Sparse teachers give ``(top-k ids, top-k log-probs at T, tail mass)``; ``tail`` names how the mass
outside the top k is treated:

- ``renormalize``: drop it; teacher and student are both renormalised over the k ids.
- ``bucket``: one extra outcome, the teacher's tail mass against the student's mass outside the k ids.
- ``uniform``: the tail mass is spread evenly over the V - k other ids (the full-vocabulary math).

With k = V there is no tail (its mass is exactly zero by definition) and all three equal the dense loss.

Sampled teachers (``signals/sampled.py``, RS-KD) give ``(ids, weights, H(p))`` with ``E[weights] = p``;
only ``forward_kl`` is defined for them, estimated as ``-H(p) - sum_s w_s log q(id_s)``, which is
linear in the weights and therefore unbiased in value and gradient. It is not clamped at 0: one
draw's estimate may be negative, and clamping would bias the mean.

Memory: the loss is computed over chunks of tokens by a custom autograd function that, for each
chunk, computes the chunk's loss and its gradient at once (the fused-cross-entropy pattern). No
[tokens, vocab] float32 tensor larger than one chunk is ever alive, and with
:func:`token_kd_loss_from_hidden` the student's full logits are never built at all. For a top-k
teacher with ``renormalize`` or ``bucket`` the divergence depends on the student only through the k
gathered logits, the log-normaliser and the log-mass outside the k ids, so autograd runs on those
small tensors and the vocabulary-wide gradient is assembled by hand from one exp pass
(:func:`_sparse_reduced`; tested equal to autograd through :func:`per_token_divergence`, the plain
definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillery.signals.base import Signal

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "jsd_unscaled", "tvd", "mse")
TAILS = ("renormalize", "bucket", "uniform")
NEG_INF = float("-inf")


# ---------------------------------------------------------------- divergences on log-probs


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs; entries with p_i = 0 contribute exactly 0."""
    dead = logp == NEG_INF
    if not dead.any():  # the common case: skip the masking copies (they cost memory per chunk)
        return (logp.exp() * (logp - logq)).sum(-1)
    # Filling before the arithmetic (not after) keeps 0 * (-inf - -inf) = NaN out of values and grads.
    lp = logp.masked_fill(dead, 0.0)
    lq = logq.masked_fill(dead, 0.0)
    return (lp.exp() * (lp - lq)).masked_fill(dead, 0.0).sum(-1)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1-w) q), exact in probability space; -inf where both are zero."""
    if w <= 0.0:
        return logq
    if w >= 1.0:
        return logp
    dead = (logp == NEG_INF) & (logq == NEG_INF)
    a = logp.masked_fill(dead, 0.0) + math.log(w)
    b = logq.masked_fill(dead, 0.0) + math.log1p(-w)
    return torch.logaddexp(a, b).masked_fill(dead, NEG_INF)


def generalized_jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float, scaled: bool = True) -> torch.Tensor:
    """Generalized JSD between teacher ``p`` and student ``q``; see the module docstring.

    ``scaled=True``: continuous in ``beta``, forward KL at 0, reverse KL at 1.
    ``scaled=False``: TRL's unscaled form (forward/reverse KL exactly at 0/1, ~0 just inside).
    """
    if beta <= 0.0:
        return kl(logp, logq)
    if beta >= 1.0:
        return kl(logq, logp)
    m = log_mix(logp, logq, beta)
    num = beta * kl(logp, m) + (1.0 - beta) * kl(logq, m)
    return num / (beta * (1.0 - beta)) if scaled else num


def divergence_from_logprobs(logp: torch.Tensor, logq: torch.Tensor, divergence: str, *,
                             beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher log-probs ``logp`` and student log-probs ``logq``."""
    if divergence == "forward_kl":
        d = kl(logp, logq)
    elif divergence == "reverse_kl":
        d = kl(logq, logp)
    elif divergence == "skew_forward_kl":
        d = kl(logp, log_mix(logp, logq, skew))
    elif divergence == "skew_reverse_kl":
        d = kl(logq, log_mix(logq, logp, skew))
    elif divergence == "jsd":
        d = generalized_jsd(logp, logq, beta, scaled=True)
    elif divergence == "jsd_unscaled":
        d = generalized_jsd(logp, logq, beta, scaled=False)
    elif divergence == "tvd":
        d = 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    else:
        raise ValueError(f"divergence: unknown {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    # Rounding can leave a true zero at -1e-9; a divergence is never negative.
    return d.clamp_min(0.0)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the vocabulary of squared logit differences; entries -inf in both are skipped."""
    both = (student_logits == NEG_INF) & (teacher_logits == NEG_INF)
    diff = (student_logits.masked_fill(both, 0.0) - teacher_logits.masked_fill(both, 0.0))
    live = (~both).sum(-1).clamp_min(1)
    return diff.square().sum(-1) / live


# ---------------------------------------------------------------- one chunk of tokens


@dataclass(frozen=True)
class KDOptions:
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    tail: str = "bucket"

    def check(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence: unknown {self.divergence!r}; expected one of {', '.join(DIVERGENCES)}")
        if self.tail not in TAILS:
            raise ValueError(f"tail: unknown {self.tail!r}; expected one of {', '.join(TAILS)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta: must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew: must be in [0, 1], got {self.skew}")


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype every loss computes in: float64 for float64 inputs, else float32 (bf16/fp16 too)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sparse_teacher_logprobs(s: torch.Tensor, ids: torch.Tensor, logp_k: torch.Tensor, tail_mass: torch.Tensor,
                             tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probs over the outcomes the ``tail`` option compares.

    ``s [n, V]`` are the student's logits already divided by T. Only what the option needs is built
    over the vocabulary: ``renormalize`` needs the k gathered logits alone.
    """
    n, vocab = s.shape
    k = ids.shape[-1]
    logp_k = logp_k.to(s.dtype)
    if tail == "renormalize":
        s_k = s.gather(-1, ids)
        return logp_k - logp_k.logsumexp(-1, keepdim=True), s_k - s_k.logsumexp(-1, keepdim=True)
    if k >= vocab:
        log_tail = s.new_full((n, 1), NEG_INF)  # the top k is the vocabulary: no tail by definition
    else:
        # A floor, not a fudge: a tail of exactly 0 would make reverse-type divergences infinite.
        log_tail = tail_mass.to(s.dtype).clamp_min(torch.finfo(s.dtype).tiny).log().unsqueeze(-1)
    if tail == "uniform":
        fill = log_tail - math.log(max(vocab - k, 1))
        return fill.expand(n, vocab).scatter(-1, ids, logp_k), F.log_softmax(s, dim=-1)
    lse = s.logsumexp(-1, keepdim=True)
    # The student's mass outside the k ids, summed directly (1 - sum(top k) would cancel badly).
    rest = s.scatter(-1, ids, NEG_INF).logsumexp(-1, keepdim=True)
    return torch.cat([logp_k, log_tail], -1), torch.cat([s.gather(-1, ids), rest], -1) - lse


def check_sampled(opts: KDOptions) -> None:
    """A sampled teacher estimates sums linear in p; of the divergences only the forward KL is one."""
    if opts.divergence != "forward_kl":
        raise ValueError(f"divergence {opts.divergence!r}: a sampled teacher signal (logit store encoding 'sampled' or "
                         "'topk_sampled') supports forward_kl only: it is the one divergence linear in the teacher's "
                         "probabilities, so sampled tokens estimate it without bias (docs/losses.md); use the 'topk' "
                         "encoding or a live teacher for other divergences")


def sampled_forward_kl(s: torch.Tensor, teacher: Signal) -> torch.Tensor:
    """Per-row unbiased estimate of KL(p || softmax(s)) from a sampled teacher: -H(p) - sum_s w_s log q(id_s)."""
    dev = s.device
    logq = F.log_softmax(s, dim=-1).gather(-1, teacher.sample_ids.to(dev).long())
    return -teacher.entropy.to(dev, s.dtype) - (teacher.sample_weights.to(dev, s.dtype) * logq).sum(-1)


def _sampled_chunk(s: torch.Tensor, teacher: Signal, want_grad: bool):
    """Loss and closed-form gradient of a chunk against a sampled teacher: ``d / d s`` of the estimate
    is ``(sum_s w_s) q - w`` scattered onto the ids (``q`` the student's softmax)."""
    dev = s.device
    ids = teacher.sample_ids.to(dev).long()
    w = teacher.sample_weights.to(dev, s.dtype)
    lse = s.logsumexp(-1, keepdim=True)
    loss = (-teacher.entropy.to(dev, s.dtype) - (w * (s.gather(-1, ids) - lse)).sum(-1)).sum()
    if not want_grad:
        return loss, None
    grad = (s - lse).exp_().mul_(w.sum(-1, keepdim=True))
    return loss, grad.scatter_add_(-1, ids, -w)


def per_token_divergence(student_logits: torch.Tensor, teacher: Signal, opts: KDOptions) -> torch.Tensor:
    """Divergence per row of ``student_logits [n, V]`` against ``teacher`` (rows aligned), in fp32/fp64."""
    cd = math_dtype(student_logits)
    s = student_logits.to(cd)
    if opts.temperature != 1.0:
        s = s / opts.temperature
    if teacher.is_sampled:
        check_sampled(opts)
        return sampled_forward_kl(s, teacher)
    if opts.divergence == "mse":
        if not teacher.is_dense:
            raise ValueError("divergence 'mse' compares logits and needs a dense teacher signal (got top-k)")
        return logit_mse(s, teacher.logits.to(s.device, cd) / opts.temperature)
    if teacher.is_dense:
        t = teacher.logits.to(s.device, cd)
        logp = F.log_softmax(t / opts.temperature if opts.temperature != 1.0 else t, dim=-1)
        logq = F.log_softmax(s, dim=-1)
    else:
        dev = s.device
        logp, logq = _sparse_teacher_logprobs(s, teacher.topk_ids.to(dev).long(), teacher.topk_logprobs.to(dev),
                                              teacher.tail_mass.to(dev), opts.tail)
    return divergence_from_logprobs(logp, logq, opts.divergence, beta=opts.beta, skew=opts.skew)


# ---------------------------------------------------------------- chunked loss with fused gradient


def _rows(signal: Signal, idx: tuple[torch.Tensor, ...]) -> Signal:
    return signal.select(tuple(i.to(signal.device) for i in idx))


def _sparse_reduced(s: torch.Tensor, teacher: Signal, opts: KDOptions, want_grad: bool):
    """Loss and gradient of one chunk for a top-k teacher with ``renormalize`` or ``bucket``.

    Those divergences depend on the student only through the k gathered logits ``s_k``, the
    log-normaliser ``lse`` and (bucket) the log-mass outside the k ids ``rest``. Autograd runs on
    those small tensors; the gradient over the vocabulary is then assembled by hand from
    d lse / d s_j = q_j and d rest / d s_j = e_j / R (j outside the k ids), reusing one exp pass.
    ``s`` is the chunk's logits / T in float32; returns (summed loss, d loss / d s or None).
    """
    dev = s.device
    ids = teacher.topk_ids.to(dev).long()
    logp_k = teacher.topk_logprobs.to(dev, s.dtype)
    s_k = s.gather(-1, ids).requires_grad_(want_grad)
    if opts.tail == "renormalize":
        with torch.enable_grad():
            d = divergence_from_logprobs(logp_k - logp_k.logsumexp(-1, keepdim=True),
                                         s_k - s_k.logsumexp(-1, keepdim=True), opts.divergence,
                                         beta=opts.beta, skew=opts.skew).sum()
        if not want_grad:
            return d.detach(), None
        (g_k,) = torch.autograd.grad(d, s_k)
        return d.detach(), torch.zeros_like(s).scatter_(-1, ids, g_k)
    n, vocab = s.shape
    m = s.amax(-1, keepdim=True)
    e = (s - m).exp_()
    z = e.sum(-1, keepdim=True)
    e_k = e.gather(-1, ids)
    e.scatter_(-1, ids, 0.0)
    r = e.sum(-1, keepdim=True)  # summed directly: 1 - sum(top k) would cancel
    lse = (m + z.log()).requires_grad_(want_grad)
    rest = (m + r.log()).requires_grad_(want_grad)
    if ids.shape[-1] >= vocab:
        log_tail = s.new_full((n, 1), NEG_INF)  # no tail by definition
    else:
        log_tail = teacher.tail_mass.to(dev, s.dtype).clamp_min(torch.finfo(s.dtype).tiny).log().unsqueeze(-1)
    with torch.enable_grad():
        logq = torch.cat([s_k, rest], -1) - lse
        d = divergence_from_logprobs(torch.cat([logp_k, log_tail], -1), logq, opts.divergence,
                                     beta=opts.beta, skew=opts.skew).sum()
    if not want_grad:
        return d.detach(), None
    g_k, g_lse, g_rest = torch.autograd.grad(d, (s_k, lse, rest))
    # r = 0 only when every e_j outside the top k is 0, so the clamp changes no product.
    grad = e.mul_(g_lse / z + g_rest / r.clamp_min(torch.finfo(s.dtype).tiny))
    return d.detach(), grad.scatter_(-1, ids, g_k + e_k * (g_lse / z))


def _dense_forward_kl(s: torch.Tensor, t: torch.Tensor, want_grad: bool):
    """Forward KL of a chunk against dense teacher logits, both already / T, with its closed-form
    gradient d KL(p || softmax(s)) / d s = q - p: four [chunk, V] buffers instead of autograd's graph.
    Returns None when a -inf logit needs the masked path."""
    logq = F.log_softmax(s, dim=-1)
    logp = F.log_softmax(t, dim=-1)
    if torch.isinf(logp).any() or torch.isinf(logq).any():
        return None
    p = logp.exp()
    d = (logp.sub_(logq).mul_(p)).sum(-1).clamp_min_(0.0).sum()
    del logp
    return d, (logq.exp_().sub_(p) if want_grad else None)


def _chunk_loss_and_grad(logits: torch.Tensor, teacher: Signal, opts: KDOptions, want_grad: bool):
    """(summed divergence of a chunk, its gradient w.r.t. ``logits`` or None)."""
    cd = math_dtype(logits)
    if teacher.is_sampled:
        s = logits.to(cd)
        loss, g = _sampled_chunk(s / opts.temperature if opts.temperature != 1.0 else s, teacher, want_grad)
        return loss, (g / opts.temperature if g is not None and opts.temperature != 1.0 else g)
    if teacher.is_dense and opts.divergence == "forward_kl":
        T = opts.temperature
        s, t = logits.to(cd), teacher.logits.to(logits.device, cd)
        got = _dense_forward_kl(s / T if T != 1.0 else s, t / T if T != 1.0 else t, want_grad)
        if got is not None:
            loss, g = got
            return loss, (g / T if g is not None and T != 1.0 else g)
    if not teacher.is_dense and opts.tail in ("renormalize", "bucket") and opts.divergence != "mse":
        s = logits.to(cd)
        s = s / opts.temperature if opts.temperature != 1.0 else s
        loss, g = _sparse_reduced(s, teacher, opts, want_grad)
        return loss, (g / opts.temperature if g is not None and opts.temperature != 1.0 else g)
    leaf = logits.detach().requires_grad_(want_grad)
    with torch.enable_grad():
        loss = per_token_divergence(leaf, teacher, opts).sum()
    return loss.detach(), (torch.autograd.grad(loss, leaf)[0] if want_grad else None)


class _ChunkedKD(torch.autograd.Function):
    """Sum of per-token divergences over ``rows``, computed chunk by chunk.

    ``x`` is either student logits ``[..., V]`` (``weight`` None) or student hidden states ``[..., H]``
    with ``weight [V, H]`` (and optional ``bias``) of the lm_head; ``rows`` are flat indices into its
    leading dims. Rows are gathered by index, never by flattening ``x`` (a non-contiguous slice such
    as ``logits[:, :-1]`` would be copied whole). Each chunk's loss and gradient are
    computed together in forward, so backward only scales the stored gradients: the chunk's
    intermediates are freed before the next chunk starts.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, signal, opts, chunk_size, scale):
        want = ctx.needs_input_grad[:3]
        x = x.detach()
        leaves = [None] + [t.detach().requires_grad_(w) if t is not None else None for t, w in zip((weight, bias), want[1:])]
        grads = [torch.zeros_like(t) if w else None for t, w in zip((x, weight, bias), want)]
        # Weight/bias grads accumulate over chunks: keep them in fp32 even for bf16 weights.
        for i in (1, 2):
            if grads[i] is not None and grads[i].dtype in (torch.bfloat16, torch.float16):
                grads[i] = grads[i].float()
        total = torch.zeros((), dtype=math_dtype(x), device=x.device)
        for r in rows.split(chunk_size):
            idx = torch.unravel_index(r, x.shape[:-1])
            with torch.enable_grad():
                # The chunk itself is the leaf: its gradient is [chunk, .], never [N, .].
                xs = leaves[0] = x[idx].requires_grad_(want[0])
                logits = xs if leaves[1] is None else F.linear(xs, leaves[1], leaves[2])
            loss, g_logits = _chunk_loss_and_grad(logits.detach(), _rows(signal, idx), opts, any(want))
            if any(want):
                wrt = [t for t, w in zip(leaves, want) if w]
                got = iter(torch.autograd.grad(logits, wrt, g_logits.to(logits.dtype)))
                for i in range(3):
                    if want[i]:
                        g = next(got)
                        if i == 0:
                            grads[0].index_put_(idx, g.to(grads[0].dtype))  # rows are unique
                        else:
                            grads[i] += g
            total += loss.detach()
        ctx.grads = grads
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight, bias)]
        ctx.scale = scale
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        out = [None if t is None else (t * (g * ctx.scale).to(t.dtype)).to(dt) for t, dt in zip(ctx.grads, ctx.dtypes)]
        return (*out, None, None, None, None, None)


def _denominator(mask: torch.Tensor, num_tokens) -> torch.Tensor:
    denom = mask.sum() if num_tokens is None else num_tokens
    return torch.as_tensor(denom, dtype=torch.float64).clamp_min(1)


def _run(x, weight, bias, signal, mask, opts: KDOptions, scale_t2, num_tokens, chunk_size):
    opts.check()
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    lead = x.shape[:-1]
    if mask.shape != lead:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match the student's leading shape {tuple(lead)}")
    if not signal.is_dense and abs(signal.identity.temperature - opts.temperature) > 1e-6:
        raise ValueError(f"temperature: the loss uses T={opts.temperature} but the sparse teacher log-probs were "
                         f"taken at T={signal.identity.temperature}; they must match")
    if signal.is_sampled:
        check_sampled(opts)
    rows = mask.reshape(-1).bool().nonzero().squeeze(1).to(x.device)
    scale = (opts.temperature**2 if scale_t2 else 1.0) / float(_denominator(mask, num_tokens))
    return _ChunkedKD.apply(x, weight, bias, rows, signal, opts, chunk_size, scale)


def _options(opts: KDOptions | None, **keywords) -> KDOptions:
    """``opts``, or KDOptions from the keywords given (KDOptions' defaults for the others); not both."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if opts is None:
        return KDOptions(**given)
    if given:
        raise ValueError(f"opts: given together with {', '.join(given)}; pass the KD settings one way")
    return opts


def token_kd_loss(student_logits: torch.Tensor, signal: Signal, mask: torch.Tensor, *,
                  opts: KDOptions | None = None, divergence: str | None = None, temperature: float | None = None,
                  scale_t2: bool = True, beta: float | None = None, skew: float | None = None,
                  tail: str | None = None, num_tokens: int | float | torch.Tensor | None = None,
                  chunk_size: int = 1024) -> torch.Tensor:
    """Sum of per-token divergences over unmasked tokens / ``num_tokens``, times T^2 (if ``scale_t2``).

    ``student_logits [..., V]``, ``signal`` aligned to it (dense ``[..., V]`` or top-k ``[..., k]``),
    ``mask [...]`` True where a token counts. ``num_tokens``: the denominator (default: the number of
    unmasked tokens here); pass the global count so that gradient accumulation and data parallelism
    give the same loss as one big batch. Returns a float32 scalar (float64 for float64 inputs).
    ``opts`` (built once by a caller that computes many losses) stands for ``divergence``,
    ``temperature``, ``beta``, ``skew`` and ``tail``; unset keywords take KDOptions' defaults.
    """
    opts = _options(opts, divergence=divergence, temperature=temperature, beta=beta, skew=skew, tail=tail)
    return _run(student_logits, None, None, signal, mask, opts, scale_t2, num_tokens, chunk_size)


def token_kd_loss_from_hidden(student_hidden: torch.Tensor, lm_head_weight: torch.Tensor, signal: Signal,
                              mask: torch.Tensor, *, lm_head_bias: torch.Tensor | None = None,
                              opts: KDOptions | None = None, divergence: str | None = None,
                              temperature: float | None = None, scale_t2: bool = True, beta: float | None = None,
                              skew: float | None = None, tail: str | None = None,
                              num_tokens: int | float | torch.Tensor | None = None,
                              chunk_size: int = 1024) -> torch.Tensor:
    """:func:`token_kd_loss` fused with the student's lm_head: ``logits = hidden @ weight.T (+ bias)``
    is computed one chunk of tokens at a time, so the student's full ``[tokens, V]`` logits are never
    built (the loop can call the model's backbone and pass its last hidden state)."""
    if lm_head_weight.shape[-1] != student_hidden.shape[-1]:
        raise ValueError(f"lm_head_weight: shape {tuple(lm_head_weight.shape)} does not match hidden size "
                         f"{student_hidden.shape[-1]}")
    opts = _options(opts, divergence=divergence, temperature=temperature, beta=beta, skew=skew, tail=tail)
    return _run(student_hidden, lm_head_weight, lm_head_bias, signal, mask, opts, scale_t2, num_tokens, chunk_size)

