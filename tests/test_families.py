"""Family traits: what training code asks a model config instead of comparing family names, and a
third family (ConvNeXt) everywhere a family goes: zoo, checkpointing, FSDP units, training, compare."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import convscale
from convscale.models import FAMILIES, BLOCK_TYPES, family_traits, get_config, is_residual_block
from convscale.models.convnext import ConvNeXtBlock
from convscale.models.nfnet import NFBlock
from convscale.models.vit import Block
from convscale.train.memory import enable_activation_checkpointing

PACKAGE = Path(convscale.__file__).parent
TINY_CONVNEXT = "convnext-w8-d1.1"  # total stride 8: trains at 16 px


def test_every_family_is_registered_with_traits():
    assert list(FAMILIES) == ["nfnet", "vit", "convnext"]
    for fam, mod in FAMILIES.items():
        traits = family_traits(fam)
        assert mod.CONFIG.family == fam and traits.block_types
        fields = {f.name for f in __import__("dataclasses").fields(mod.CONFIG)}
        assert {traits.dropout_field, traits.drop_path_field} <= fields
        assert traits.finetune_defaults["optimizer"] in ("sgd_agc", "adamw")
    assert set(BLOCK_TYPES) == {NFBlock, Block, ConvNeXtBlock}


def test_memory_format_defaults_are_the_old_ones():
    nf, vit, cnx = (family_traits(f) for f in ("nfnet", "vit", "convnext"))
    assert nf.channels_last(None, "cpu") and not nf.channels_last(None, "cuda")
    assert nf.channels_last(True, "cuda") and not nf.channels_last(False, "cpu")
    assert not any(vit.channels_last(r, d) for r in (None, True, False) for d in ("cpu", "cuda"))
    assert not cnx.channels_last(None, "cpu") and cnx.channels_last(True, "cpu")


def test_no_family_name_switch_outside_the_models():
    """Training, sweeps, fits and reports ask the config (traits), never compare a family's name."""
    switch = re.compile(r"""(family|fam)\s*(==|!=)\s*["'](nfnet|vit|convnext)["']|\.startswith\(["'](nfnet|vit)""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("models/") or rel == "train/config.py":  # config.py: an unused helper, another owner's file
            continue
        offenders += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if switch.search(line)]
    assert offenders == []


def test_checkpointing_wraps_convnext_blocks_and_keeps_the_numbers():
    torch.manual_seed(0)
    model = get_config("convnext-w8-d1.2", num_classes=5, drop_path_rate=0.2).build()
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])

    def grads(m):
        torch.manual_seed(1)  # drop-path masks
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        return [p.grad.clone() for p in m.parameters()]

    plain = grads(model)
    assert enable_activation_checkpointing(model) == 3
    for a, b in zip(plain, grads(model)):
        torch.testing.assert_close(a, b)


def test_fsdp_units_are_the_checkpointing_blocks(monkeypatch):
    import torch.distributed.fsdp as fsdp

    from convscale.train.distributed import fsdp_shard

    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: sharded.append(module))
    for name in (TINY_CONVNEXT, "vit-tiny", "nfnet-tiny"):
        model = get_config(name, num_classes=3).build()
        sharded.clear()
        fsdp_shard(model)
        blocks = [m for m in model.modules() if is_residual_block(m)]
        assert blocks and sharded == [*blocks, model]


def test_convscale_models_lists_convnext(capsys):
    from convscale.cli.main import main

    assert main(["models", "--family", "convnext", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["convnext-t", "convnext-s", "convnext-b", "convnext-l", "convnext-xl"]
    assert main(["models", "--family", "resnet"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_train_a_tiny_convnext_two_steps(tmp_path, capsys):
    from convscale.cli.main import main

    args = ["train", "--run-dir", str(tmp_path / "run"), "--model", TINY_CONVNEXT, "--data", "digits",
            "--resolution", "16", "--batch-size", "16", "--steps", "2", "--threads", "1", "--quiet",
            "--set", "activation_checkpointing=true"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == "done" and result["steps"] == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["family"] == "convnext"
    # a fine-tune of it starts from the family's defaults, with its dropout field
    from convscale.data.config import DataConfig
    from convscale.train.finetune import finetune_config

    ft = finetune_config(tmp_path / "run", str(tmp_path / "ft"), DataConfig(kind="digits", resolution=16),
                         dropout=0.1, drop_path_rate=0.05)
    assert ft.optimizer == "adamw" and ft.lr == family_traits("convnext").finetune_defaults["lr"]
    assert ft.model_overrides == {"dropout": 0.1, "drop_path_rate": 0.05}


def test_convnext_runs_channels_last_with_the_same_numbers():
    from convscale.train.trainee import to_channels_last

    torch.manual_seed(0)
    model = get_config("convnext-w8-d1.1", num_classes=4).build()
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    got = to_channels_last(model)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture
def three_family_sweep(tmp_path, monkeypatch):
    import support
    from support import make_sweep

    monkeypatch.setitem(support.LAWS, "convnext", (40.0, 0.11))
    make_sweep(tmp_path / "two", families=("nfnet", "vit"), curves=False)
    make_sweep(tmp_path / "three", families=("convnext", "nfnet", "vit"), curves=False)
    return tmp_path


def test_compare_takes_any_number_of_families(three_family_sweep):
    from convscale.report import compare, compare_all, format_comparison, format_comparisons, load_sweep

    two = load_sweep(three_family_sweep / "two", bootstrap=10)
    (only,) = compare_all(two)
    assert only.families == ("nfnet", "vit")
    assert format_comparisons([only]) == format_comparison(compare(two))
    three = load_sweep(three_family_sweep / "three", bootstrap=10)
    cmps = compare_all(three)
    assert [c.families for c in cmps] == [("nfnet", "vit"), ("nfnet", "convnext")]
    assert all(r["winner"] in ("nfnet", "convnext") for r in cmps[1].budgets)
    assert "nfnet vs convnext at matched compute" in format_comparisons(cmps)


@pytest.mark.slow  # over ~2 s on a loaded 2-core machine: not in the quick loop
def test_report_has_a_section_per_pair(three_family_sweep):
    from convscale.report import build_report

    result = build_report(three_family_sweep / "three", bootstrap=10)
    md = (result.out_dir / "summary.md").read_text()
    assert "nfnet vs vit at matched compute" in md and "nfnet vs convnext at matched compute" in md
    assert len(json.loads((result.out_dir / "compare.json").read_text())) == 2
    assert len(result.comparisons) == 2
    pairs = [f for f in result.findings if f.key == "families"]
    assert {f.family.split(" (")[0] for f in pairs} == {"nfnet vs vit", "nfnet vs convnext"}
    assert all(("nfnet and convnext" in f.paper) == ("convnext" in f.family) for f in pairs)
