"""The model on a CUDA device: the Triton backend in bf16 against SDPA and an fp32 reference, KV-cache decoding."""
from __future__ import annotations

import pytest
import torch

from igpt.pretrain.model import IGPT, IGPTConfig, KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("n_embd, n_head, objective", [(256, 4, "ar"), (384, 4, "ar"), (256, 2, "bert")])
def test_triton_bf16_as_accurate_as_sdpa(n_embd, n_head, objective):
    """Head dims 64, 96 and 128 at context 1024: bf16 loss and gradients of the Triton model sit as
    close to an fp32 reference model as those of the SDPA model."""
    torch.manual_seed(0)
    cfg = dict(n_ctx=1024, n_layer=2, n_embd=n_embd, n_head=n_head, objective=objective)
    models = {b: IGPT(IGPTConfig(**cfg, attn_backend=b)).cuda() for b in ("reference", "sdpa", "triton")}
    torch.nn.init.normal_(models["reference"].head.weight, std=0.05)
    for m in models.values():
        m.load_state_dict(models["reference"].state_dict())
    x = torch.randint(0, 512, (4, 1024), device="cuda")
    losses, grads = {}, {}
    for backend, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=backend != "reference"):
            loss = model.loss(x, generator=torch.Generator("cuda").manual_seed(1))
        loss.backward()
        losses[backend] = loss.detach()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for backend in ("sdpa", "triton"):
        assert relative_error(losses[backend], losses["reference"]) < 1e-2
    sdpa_err = relative_error(grads["sdpa"], grads["reference"])
    triton_err = relative_error(grads["triton"], grads["reference"])
    assert triton_err < 1.5 * sdpa_err + 1e-3, (triton_err, sdpa_err)


@pytest.mark.parametrize("backend", ["sdpa", "triton", "auto"])
def test_kv_cache_decoding_on_gpu(backend):
    torch.manual_seed(0)
    model = IGPT(IGPTConfig(n_ctx=256, n_layer=2, n_embd=128, n_head=2, attn_backend=backend)).cuda()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    x = torch.randint(0, 512, (3, 256), device="cuda")
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model.cfg.n_layer, 256)
        steps = [model.decode(x, cache, 128)] + [model.decode(x, cache, end) for end in range(129, 257)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-3, atol=1e-3)
    out = model.generate(prefix=x[:, :128], generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape == (3, 256) and out[:, :128].equal(x[:, :128])
