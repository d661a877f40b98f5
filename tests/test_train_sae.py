"""The top-k SAE trainer: recovery of a known dictionary, AuxK, scale folding, save/load."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.sae.formats import load_sae
from pipeline.sae.train import TopKSAE, TrainConfig, train_topk_sae

torch.set_num_threads(1)


def sparse_data(n: int, d: int, n_true: int, active: int, seed: int, offset: float = 2.0, noise: float = 0.01):
    """Rows = sum of `active` distinct random unit directions with positive magnitudes, plus an
    offset shared by all rows (like a residual stream's mean), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    ids = torch.rand(n, n_true, generator=g).argsort(dim=1)[:, :active]
    mags = 0.5 + torch.rand(n, active, generator=g)
    x = torch.nn.functional.embedding_bag(ids, D, per_sample_weights=mags, mode="sum")
    x += offset * torch.randn(d, generator=g) / math.sqrt(d) + noise * torch.randn(n, d, generator=g)
    return x * 7.0, D  # an arbitrary overall scale, so folding s back in actually matters


@pytest.fixture(scope="module")
def trained():
    x, D = sparse_data(n=12_000, d=32, n_true=64, active=4, seed=0)
    cfg = TrainConfig(n_latents=128, k=4, batch_size=256, epochs=20, seed=0, log_every=50)
    lines: list[str] = []
    sae, report = train_topk_sae(x, cfg, hookpoint="layers.3", progress=lines.append)
    return x, D, sae, report, lines, cfg


def test_learns_known_dictionary(trained):
    x, D, sae, report, _, _ = trained
    assert report.fvu < 0.1, report
    W = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best_cos = (D @ W.T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() >= 0.9, best_cos
    # The report's held-out FVU is what SAE.encode/decode give on raw rows.
    hold = x[-2000:]
    values, ids = sae.encode(hold)
    fvu = (hold - sae.decode(values, ids)).pow(2).sum() / (hold - hold.mean(0)).pow(2).sum()
    assert fvu < 0.1


def test_decoder_rows_unit_norm_before_folding(trained):
    _, _, sae, report, _, _ = trained
    s = report.input_scale
    assert s != pytest.approx(1.0, rel=0.05)  # the data was scaled, so the check below is not vacuous
    torch.testing.assert_close(sae.W_dec.norm(dim=1) * s, torch.ones(sae.n_latents), rtol=1e-5, atol=1e-5)


def test_report_and_progress(trained):
    _, _, sae, report, lines, cfg = trained
    assert report.steps > 0 and report.tokens_seen == report.steps * cfg.batch_size
    assert report.l0 == cfg.k and report.n_holdout == 1200 and report.n_train == 10_800
    assert 0.0 <= report.dead_fraction <= 1.0 and report.seconds > 0
    assert sae.meta["train"] == report.to_dict()
    assert sae.hookpoint == "layers.3" and sae.input_norm == "none" and sae.activation == "topk_relu"
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == math.ceil(report.steps / cfg.log_every)
    assert all(" fvu " in line and " dead " in line for line in step_lines)


def test_scale_folding_is_exact():
    d, L, k, s = 24, 96, 6, 3.7
    g = torch.Generator().manual_seed(1)
    model = TopKSAE(d, L, k, torch.randn(d, generator=g), g)
    with torch.no_grad():
        model.b_enc.normal_(generator=g)
        model.W_enc.add_(0.3 * torch.randn(L, d, generator=g))  # untie, so W_enc and W_dec are both checked
    x = torch.randn(500, d, generator=g) * 5
    sae = model.to_sae(s)
    values, ids = sae.encode(x)  # raw inputs, streaming kernel
    ref_values, ref_ids = model.encode(x * s)  # training space, dense torch.topk
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids.long(), ref_ids)
    x_hat_train = torch.nn.functional.embedding_bag(ref_ids, model.W_dec, per_sample_weights=ref_values, mode="sum")
    x_hat_train = x_hat_train + model.b_dec
    torch.testing.assert_close(sae.decode(values, ids), x_hat_train.detach() / s, rtol=1e-5, atol=1e-5)


def test_sparse_backward_matches_dense_autograd():
    # The training forward back-propagates only through selected entries; it must give the
    # same gradients as the plain dense formulation, AuxK term included.
    d, L, k, aux_k = 16, 64, 4, 8
    g = torch.Generator().manual_seed(2)
    model = TopKSAE(d, L, k, torch.randn(d, generator=g), g)
    with torch.no_grad():
        model.b_enc.normal_(generator=g)
    x = torch.randn(32, d, generator=g)
    dead = torch.zeros(L, dtype=torch.bool)
    dead[::3] = True

    def loss_of(x_hat, aux_hat):
        return (x - x_hat).pow(2).sum() + 0.3 * (aux_hat - (x - x_hat).detach()).pow(2).sum()

    x_hat, _, _, aux_hat = model(x, dead, aux_k)
    loss_of(x_hat, aux_hat).backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    pre = (x - model.b_dec) @ model.W_enc.T + model.b_enc
    v, i = pre.topk(k)
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    va, ia = torch.where(dead, pre, -torch.inf).topk(aux_k)
    z_aux = torch.zeros_like(pre).scatter(1, ia, va.relu())
    loss_of(z @ model.W_dec + model.b_dec, z_aux @ model.W_dec).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-3, msg=name)


def test_decoder_gradient_made_tangent():
    g = torch.Generator().manual_seed(4)
    model = TopKSAE(8, 16, 2, torch.zeros(8), g)
    model.W_dec.grad = torch.randn(16, 8, generator=g)
    before = model.W_dec.grad.clone()
    model.remove_parallel_decoder_grad()
    W, grad = model.W_dec.detach(), model.W_dec.grad
    torch.testing.assert_close((grad * W).sum(dim=1), torch.zeros(16), atol=1e-6, rtol=0)
    # Only the parallel part was removed.
    torch.testing.assert_close(before - grad, (before * W).sum(dim=1, keepdim=True) * W)


def test_save_and_reload_identical(trained, tmp_path):
    x, _, sae, report, _, _ = trained
    loaded = load_sae(sae.save(tmp_path / "sae"))
    v0, i0 = sae.encode(x[:1000])
    v1, i1 = loaded.encode(x[:1000])
    assert torch.equal(v0, v1) and torch.equal(i0, i1)
    assert loaded.meta["train"]["fvu"] == report.fvu and loaded.hookpoint == "layers.3"


def test_auxk_revives_dead_latents():
    # Many more true directions than latents and a high learning rate: without AuxK about a
    # third of the latents stop firing for good; AuxK trains dead latents on the residual
    # the live ones leave, which brings them back.
    x, _ = sparse_data(n=6000, d=32, n_true=512, active=4, seed=3)
    base = {"n_latents": 256, "k": 4, "batch_size": 256, "epochs": 6, "lr": 5e-2, "dead_tokens": 1000, "log_every": 0}
    for seed in (0, 1):
        _, with_aux = train_topk_sae(x, TrainConfig(**base, seed=seed), progress=lambda _: None)
        _, no_aux = train_topk_sae(x, TrainConfig(**base, seed=seed, aux_coef=0.0), progress=lambda _: None)
        assert no_aux.dead_fraction > 0.25, no_aux  # the setup really does kill latents
        assert with_aux.dead_fraction < no_aux.dead_fraction - 0.1, (with_aux, no_aux)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        train_topk_sae(torch.randn(10), TrainConfig(n_latents=8, k=2))


def test_demo_sae_cache_is_keyed_by_the_model_dtype(tmp_path):
    """The demo SAE fitted on a float32 forward is not reused for a bfloat16 one (or back): their
    activations differ. Fails if `cache_path` ignores the dtype."""
    from pipeline.config import CorpusConfig, TrainSAEConfig
    from pipeline.data.corpus import CorpusFile
    from pipeline.sae.demo import cache_path

    train = TrainSAEConfig(cache_dir=str(tmp_path))
    files = [CorpusFile(url=str(tmp_path / "a.jsonl"), format="jsonl", size=1, fingerprint="f1")]
    key = dict(train=train, model_sha="abc", hookpoint="layers.1", files=files, corpus=CorpusConfig())
    assert cache_path(model_dtype="float32", **key) == cache_path(model_dtype="float32", **key)
    assert cache_path(model_dtype="float32", **key) != cache_path(model_dtype="bfloat16", **key)
