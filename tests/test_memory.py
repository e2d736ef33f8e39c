"""Activation checkpointing changes memory, not numbers; peak memory is recorded per run."""

from __future__ import annotations

import torch

from convscale.models import create_model
from convscale.train.memory import enable_activation_checkpointing


def _grads(name: str, checkpointing: bool, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kw)
    names_before = [n for n, _ in model.named_parameters()]
    if checkpointing:
        assert enable_activation_checkpointing(model) > 0
    assert [n for n, _ in model.named_parameters()] == names_before  # names (and checkpoints) unchanged
    model.train()
    torch.manual_seed(1)  # same dropout / drop-path masks in both runs
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_gradients():
    for name, kw in [("nfnet-w0.0625-d1.2.1", {"drop_path_rate": 0.2}), ("vit-w32-d2-p4", {"drop_path_rate": 0.2, "image_size": 32})]:
        loss0, g0 = _grads(name, False, **kw)
        loss1, g1 = _grads(name, True, **kw)
        assert torch.equal(loss0, loss1)
        assert g0.keys() == g1.keys() and len(g0) > 5
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_checkpointing_is_skipped_under_no_grad():
    model = create_model("vit-w32-d2-p4", num_classes=10, image_size=32)
    enable_activation_checkpointing(model)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_copy_of_a_checkpointed_model_runs_its_own_weights():
    """The EMA model is a deepcopy: each of its blocks must call the copy's weights, with or
    without grad (the checkpointed forward used to hold the live block, so the EMA evaluated
    partly the live weights)."""
    import copy

    torch.manual_seed(0)
    for name, kw in [("nfnet-w0.0625-d1.2.1", {}), ("vit-w32-d2-p4", {"image_size": 32})]:
        live = create_model(name, num_classes=10, **kw).eval()
        enable_activation_checkpointing(live)
        twin = copy.deepcopy(live)
        with torch.no_grad():
            for p in twin.parameters():  # (the ViT's classifier starts at zero: add, not scale)
                p.add_(torch.randn_like(p) * 0.1)
        plain = create_model(name, num_classes=10, **kw).eval()
        plain.load_state_dict(twin.state_dict())
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                assert torch.equal(twin(x), plain(x)), (name, grad)
                assert not torch.allclose(twin(x), live(x))


def test_ema_held_out_loss_is_identical_with_and_without_checkpointing(tmp_path):
    """The issue's measurement: the live model agreed, the EMA's loss did not (2.302154 vs
    2.302132), because the EMA copy's checkpointed blocks ran the live weights."""
    from convscale.data.config import DataConfig
    from convscale.train.config import TrainConfig
    from convscale.train.loop import run

    results = []
    for ac in (False, True):
        cfg = TrainConfig().replace(run_dir=str(tmp_path / f"ac{ac}"), model="nfnet-tiny", steps=6, lr=0.4, batch_size=16,
                          data=DataConfig(resolution=16, num_classes=10, heldout_images=64), ema_decay=0.5,
                          agc_exempt_scalar_gains=True, precision="fp32", activation_checkpointing=ac,
                          checkpoint_every_seconds=0, threads=1, quiet=True)
        results.append(run(cfg))
    plain, checkpointed = results
    assert plain["heldout_loss"] == checkpointed["heldout_loss"]
    assert plain["ema_heldout_loss"] == checkpointed["ema_heldout_loss"]
    assert plain["ema_heldout_loss"] != plain["heldout_loss"]  # the EMA is a different model
