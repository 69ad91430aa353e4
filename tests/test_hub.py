"""The Hugging Face `kernels` route (rmsnorm_ext.hub) equals the replace_norms route on a
tiny random-init LlamaForCausalLM: logits, and loss/gradients/parameters after one
training step; also in inference mode and compiled. No Hub download (HF_HUB_OFFLINE)."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

import rmsnorm_ext  # noqa: E402
import rmsnorm_ext.hub as hub  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norm weights off their init so they matter
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return m


def _norms(model):
    return [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]


def _step(model, ids):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {k: p.detach().clone() for k, p in model.named_parameters()}


def test_layers_satisfy_kernels_contract():
    for layer in hub.LAYERS.values():
        assert layer.__init__ is torch.nn.Module.__init__
        assert layer.has_backward is True and layer.can_torch_compile is True
    m = hub.kernel_mapping()
    assert set(m) == {"RMSNorm", "RMSNormZeroCentered"} and set(m["RMSNorm"]) == {"cpu", "cuda"}
    assert m["RMSNorm"]["cpu"].load() is hub.RMSNorm


def test_training_route_equals_replace_norms():
    base = _llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    via_replace, via_hub = copy.deepcopy(base), copy.deepcopy(base)
    assert rmsnorm_ext.replace_norms(via_replace) == 5
    hub.kernelize(via_hub, mode="training", device="cpu")
    norms = _norms(via_hub)
    assert len(norms) == 5
    assert all(n.forward.__func__ is hub.RMSNorm.forward for n in norms)
    with torch.no_grad():
        want = via_replace(ids).logits
        torch.testing.assert_close(via_hub(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(base(ids).logits, want, rtol=1e-5, atol=1e-5)  # vs HF's own
    l1, g1, p1 = _step(via_replace, ids)
    l2, g2, p2 = _step(via_hub, ids)
    torch.testing.assert_close(l2, l1, rtol=0, atol=0)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=0, atol=0, msg=lambda m: f"grad {k}: {m}")
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=0, msg=lambda m: f"param {k}: {m}")


def test_inference_and_compile_modes():
    base = _llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    ref = copy.deepcopy(base)
    rmsnorm_ext.replace_norms(ref)
    with torch.no_grad():
        want = ref(ids).logits
    inf = hub.kernelize(copy.deepcopy(base).eval(), mode="inference")
    comp = hub.kernelize(copy.deepcopy(base), mode="training+compile")
    assert all(n.forward.__func__ is hub.RMSNorm.forward for n in _norms(comp))
    compiled = torch.compile(comp, backend="aot_eager")  # traces through the fake kernels
    with torch.no_grad():
        torch.testing.assert_close(inf(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(compiled(ids).logits, want, rtol=1e-6, atol=1e-6)
    compiled(ids, labels=ids).loss.backward()  # backward through the compiled graph
    assert all(n.weight.grad is not None for n in _norms(comp))


def test_zero_centered_layer_matches_gemma_style():
    class ZeroCentered(torch.nn.Module):  # Qwen3.5's RMSNormZeroCentered, as HF writes it
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(0.1 * torch.randn(dim))

        def forward(self, x):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (1.0 + self.weight.float())).type_as(x)

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), ZeroCentered(16))
    x = torch.randn(3, 16)
    want = model(x)
    hub.kernelize(model, mode="training", device="cpu")
    assert model[1].forward.__func__ is hub.RMSNormZeroCentered.forward
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_bad_mode_and_device():
    with pytest.raises(ValueError, match="mode"):
        hub.kernelize(_llama(), mode="fast")
    with pytest.raises(ValueError, match="cpu and cuda"):
        hub.kernelize(_llama(), mode="training", device="mps")
