"""transformers models as they come: ``ModelOutput`` (``output="logits"``), default SDPA
attention, a causal-LM loss over (B, T, V). Runs where transformers is installed (the GPU machine;
it is not a test dependency): the default-attention model's products equal the eager-attention
model's in float64 double backward."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import curvkit as ck

transformers = pytest.importorskip("transformers")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def _pair(name):
    if name == "gpt2":
        cfg = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        make = lambda impl: transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation=impl))  # noqa: E731
    else:
        cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32)
        make = lambda impl: transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation=impl))  # noqa: E731
    torch.manual_seed(0)
    fused = make("sdpa").to(DEVICE).eval()
    ref = make("eager").to(DEVICE).eval()
    ref.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(2):
        x = torch.randint(0, 64, (3, 16), generator=g)
        y = torch.roll(x, -1, dims=1)
        y[:, -1] = -100  # no target past the end: the causal-LM convention
        data.append((x.to(DEVICE), y.to(DEVICE)))
    return fused, ref.double(), data


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_default_attention_model_products_equal_eager_float64(name):
    fused, ref, data = _pair(name)
    H = ck.hessian(fused, lm_loss, data, output="logits")
    H_ref = ck.hessian(ref, lm_loss, data, output="logits", method="double-backward")
    G, G_ref = ck.ggn(fused, lm_loss, data, output="logits"), ck.ggn(ref, lm_loss, data, output="logits")
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with warnings.catch_warnings():  # fused SDPA kernels are re-run differentiably (a FallbackWarning)
        warnings.simplefilter("ignore", ck.errors.FallbackWarning)
        HV = H @ V  # float32 through the default attention, against float64 eager
    for got, want in ((HV, H_ref @ V.double()), (G @ V, G_ref @ V.double())):
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-4, err
    top = ck.eigenvalues(H_ref, k=1, tol=1e-6)
    assert top.converged

