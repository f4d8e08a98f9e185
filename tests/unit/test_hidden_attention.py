"""Hidden-state and attention matching on tiny random Llama models: references, shapes, capture,
and a student that lowers both terms when trained against a teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from distillery.losses.attention import (attention_map_loss, attention_maps_loss, attention_probs_from_qk,
                                         capture_representations, even_attention_pairs)
from distillery.losses.hidden import (ProjectionHeads, check_layer_map, even_layer_map, hidden_state_loss,
                                      hidden_states_loss)


def tiny_llama(layers: int, hidden: int, heads: int, kv: int, seed: int, attn: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=2 * hidden,
                                   max_position_embeddings=64, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg)


def test_even_layer_map_and_validation():
    assert even_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert even_layer_map(15, 30, num_pairs=3) == [(5, 10), (10, 20), (15, 30)]
    assert check_layer_map([[0, 0], [2, 30]], 2, 30) == [(0, 0), (2, 30)]
    with pytest.raises(ValueError, match=r"layer_map\[1\]: teacher layer 31"):
        check_layer_map([[0, 0], [2, 31]], 2, 30)
    with pytest.raises(ValueError, match="num_pairs"):
        even_layer_map(2, 4, num_pairs=3)


def test_hidden_losses_match_float64_references():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    sn, tn = s[mask].numpy(), t[mask].numpy()
    mse = np.mean(np.mean((sn - tn) ** 2, -1))
    cos = np.mean(1 - (sn * tn).sum(-1) / np.linalg.norm(sn, axis=-1) / np.linalg.norm(tn, axis=-1))
    a = sn / np.linalg.norm(sn, axis=-1, keepdims=True)
    b = tn / np.linalg.norm(tn, axis=-1, keepdims=True)
    logits = a @ b.T / 0.1
    nce = np.mean(np.log(np.exp(logits).sum(-1)) - np.diag(logits))
    assert hidden_state_loss(s, t, mask, kind="mse").item() == pytest.approx(mse, rel=1e-12)
    assert hidden_state_loss(s, t, mask, kind="cosine").item() == pytest.approx(cos, rel=1e-12)
    assert hidden_state_loss(s, t, mask, kind="infonce", temperature=0.1).item() == pytest.approx(nce, rel=1e-9)
    assert hidden_state_loss(s, s, mask, kind="mse").item() == 0.0
    with pytest.raises(ValueError, match="hidden.kind"):
        hidden_state_loss(s, t, mask, kind="l1")
    with pytest.raises(ValueError, match="ProjectionHeads"):
        hidden_state_loss(s, t[..., :4], mask)


def test_projection_heads_only_when_widths_differ():
    assert len(ProjectionHeads([(1, 2)], 16, 16).heads) == 0
    heads = ProjectionHeads([(1, 2), (2, 4)], 16, 32)
    assert set(heads.heads) == {"1_2", "2_4"}
    x = torch.randn(3, 16)
    y = heads(x, (1, 2))
    assert y.shape == (3, 32)
    torch.testing.assert_close(y[:, :16], x)  # starts as a padded identity


def _ref_attention(q, k, key_mask):
    b, h, t, d = q.shape
    out = np.zeros((b, h, t, t))
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                allowed = [j for j in range(i + 1) if key_mask[bi, j]]
                if not allowed:
                    continue
                sc = np.array([q[bi, hi, i] @ k[bi, hi // (h // k.shape[1]), j] / np.sqrt(d) for j in allowed])
                e = np.exp(sc - sc.max())
                out[bi, hi, i, allowed] = e / e.sum()
    return out


def test_attention_probs_from_qk_reference_with_gqa_and_padding():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64)
    key_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = attention_probs_from_qk(q, k, key_mask).double().numpy()
    np.testing.assert_allclose(got, _ref_attention(q.numpy(), k.numpy(), key_mask.numpy()), atol=1e-6)


def test_attention_map_kl_reference_and_head_modes():
    g = torch.Generator().manual_seed(2)
    s = attention_probs_from_qk(torch.randn(1, 2, 4, 3, generator=g), torch.randn(1, 2, 4, 3, generator=g)).double()
    t = attention_probs_from_qk(torch.randn(1, 4, 4, 3, generator=g), torch.randn(1, 4, 4, 3, generator=g)).double()
    sa, ta = s.mean(1).numpy()[0], t.mean(1).numpy()[0]
    want = np.mean([np.sum([ta[i, j] * np.log(ta[i, j] / sa[i, j]) for j in range(i + 1)]) for i in range(4)])
    assert attention_map_loss(s, t).item() == pytest.approx(want, rel=1e-9)
    tg = t.unflatten(1, (2, 2)).mean(2).numpy()[0]
    sg = s.numpy()[0]
    want_g = np.mean([[np.sum([tg[h, i, j] * np.log(tg[h, i, j] / sg[h, i, j]) for j in range(i + 1)])
                       for i in range(4)] for h in range(2)])
    assert attention_map_loss(s, t, head_mode="grouped").item() == pytest.approx(want_g, rel=1e-9)
    assert attention_map_loss(t, t, head_mode="grouped").item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="head_mode"):
        attention_map_loss(s, t, head_mode="max")


def test_capture_switches_sdpa_to_eager_and_back():
    model = tiny_llama(2, 32, 4, 2, seed=0, attn="sdpa")
    ids = torch.randint(0, 64, (2, 6))
    am = torch.ones(2, 6, dtype=torch.long)
    am[0, :2] = 0  # left padding
    out = capture_representations(model, ids, am)
    assert model.config._attn_implementation == "sdpa"
    assert len(out["hidden_states"]) == 3 and len(out["attentions"]) == 2
    a = out["attentions"][0]
    assert a.shape == (2, 4, 6, 6)
    torch.testing.assert_close(a[1].sum(-1), torch.ones(4, 6))
    assert a[1].triu(1).abs().max() == 0  # causal
    # the captured map equals the one recomputed from q and k (with RoPE) of the same layer
    layer = model.model.layers[0].self_attn
    got = {}
    h = layer.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o))
    h2 = layer.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    h.remove(), h2.remove()
    pos = torch.arange(6).expand(2, 6)
    cos, sin = model.model.rotary_emb(got["q"], pos)
    q = got["q"].view(2, 6, 4, 8).transpose(1, 2)
    k = got["k"].view(2, 6, 2, 8).transpose(1, 2)
    q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    mine = attention_probs_from_qk(q, k, am.bool())
    torch.testing.assert_close(mine[1], a[1].detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mine[0, :, 2:], a[0, :, 2:].detach(), atol=1e-5, rtol=1e-4)


def test_hidden_and_attention_terms_decrease_when_training_a_tiny_student():
    teacher = tiny_llama(4, 48, 4, 2, seed=1).eval()
    with torch.no_grad():  # random init attends almost uniformly; give the teacher sharp maps to learn
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    student = tiny_llama(2, 32, 2, 1, seed=2)  # narrower, fewer heads, half depth
    pairs = even_layer_map(2, 4)
    heads = ProjectionHeads(pairs, 32, 48)
    att_pairs = even_attention_pairs(2, 4)
    opt = torch.optim.AdamW([*student.parameters(), *heads.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    mask = torch.ones(4, 16, dtype=torch.bool)
    with torch.no_grad():
        t_out = capture_representations(teacher, ids, mask.long())
    history = []
    for _ in range(30):
        s_out = capture_representations(student, ids, mask.long())
        hid = hidden_states_loss(s_out["hidden_states"], t_out["hidden_states"], pairs, mask, projector=heads)
        att = attention_maps_loss(s_out["attentions"], t_out["attentions"], att_pairs, mask)
        opt.zero_grad()
        (hid + att).backward()
        opt.step()
        history.append((hid.item(), att.item()))
    (h0, a0), (h1, a1) = history[0], history[-1]
    assert h1 < 0.5 * h0, history
    assert a1 < 0.8 * a0, history
    # the heads belong to the run, not the student: nothing of theirs is in the student's state
    assert not any("heads" in k for k in student.state_dict())
