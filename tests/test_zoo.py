"""The zoo registry and `convscale models`: names, aliases, the FLOP convention, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import convscale
from convscale.cli.main import main
from convscale.errors import UserError
from convscale.models import count_params, create_model, get_config, model_names, zoo_table


def run_cli(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "convscale", *args], capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_zoo_lists_every_named_variant():
    names = model_names()
    expected = [f"nfnet-f{k}" for k in range(8)] + [f"nfnet-f{k}+" for k in range(8)]
    expected += ["vit-ti16", "vit-s16", "vit-b16", "vit-l16", "vit-h14", "vit-g14", "vit-gg14", "vit-so400m14"]
    expected += ["convnext-t", "convnext-s", "convnext-b", "convnext-l", "convnext-xl"]
    assert sorted(names) == sorted(expected)
    assert model_names("vit") == [n for n in names if n.startswith("vit-")]


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("NFNet-F7+", "nfnet-f7+"),
        ("nfnet-f0", "nfnet-f0"),
        ("NFNet-F3", "nfnet-f3"),
        ("ViT-B/16", "vit-b16"),
        ("ViT-G/14", "vit-gg14"),
        ("ViT-g/14", "vit-g14"),
        ("vit-so400m14", "vit-so400m14"),
    ],
)
def test_paper_spellings_are_aliases(alias, canonical):
    assert get_config(alias).name == canonical


def test_scaled_down_names_round_trip():
    for name in ["nfnet-w0.0625-d1.1.1", "vit-w64-d4-p4"]:
        cfg = get_config(name, num_classes=10)
        assert cfg.name == name
        assert get_config(cfg.name, num_classes=10) == cfg


def test_create_model_public_api_with_overrides():
    model = convscale.create_model("vit-tiny", num_classes=7, pool="gap")
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 7)
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.out_features == 7
    nf = create_model("nfnet-tiny", num_classes=5)
    assert nf(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_training_flops_are_three_times_forward():
    (row,) = zoo_table(["nfnet-f0"], resolution=224)
    assert row["train_gflops"] == pytest.approx(3 * row["gflops"])
    # F0 at 224 px: 2 x MACs of a 71.5M-parameter network, between the 192-px and 256-px figures
    assert 2 * 7.0 < row["gflops"] < 2 * 12.38


def test_params_do_not_depend_on_allocation():
    cfg = get_config("nfnet-tiny", num_classes=10)
    real = sum(p.numel() for p in cfg.build().parameters())
    assert count_params(cfg) == real


def _without_classifier(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.classifier.parameters())


@pytest.mark.parametrize(
    "name, overrides",
    [("nfnet-tiny", {}), ("nfnet-w0.0625+-d1.2", {}), ("vit-tiny", {}), ("vit-tiny", {"pool": "map"})],
)
def test_params_without_head_equal_built_model_minus_its_classifier(name, overrides):
    cfg = get_config(name, num_classes=37, **overrides)
    model = cfg.build()
    assert count_params(cfg, include_head=False) == _without_classifier(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert cfg.head_params == head > 0 and count_params(cfg) - count_params(cfg, include_head=False) == head
    if overrides.get("pool") == "map":  # the MAP pooling head is body, not classifier
        assert count_params(cfg, include_head=False) > count_params(get_config(name, num_classes=37), include_head=False)


def test_classifier_share_of_nfnet_f0_at_30k_classes():
    f0_30k, f0_1k = get_config("nfnet-f0", num_classes=30_000), get_config("nfnet-f0")
    with torch.device("meta"):
        assert count_params(f0_30k, include_head=False) == _without_classifier(f0_30k.build()) == 68_416_284
    assert count_params(f0_1k, include_head=False) == 68_416_284  # the body does not follow the classes
    assert count_params(f0_30k) == 68_416_284 + (3072 + 1) * 30_000 == 160_606_284
    assert round(1 - 68_416_284 / count_params(f0_30k), 3) == 0.574  # the head is 57 % of N
    with torch.device("meta"):
        b16 = get_config("vit-b16", num_classes=30_000)
        assert count_params(b16, include_head=False) == _without_classifier(b16.build()) == 85_798_656


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="did you mean.*nfnet-f1"):
        get_config("nfnet-f11")
    with pytest.raises(UserError, match="unknown vit option"):
        get_config("vit-b16", patch=12)
    with pytest.raises(UserError, match="num_classes"):
        get_config("vit-b16", num_classes=0)


def test_models_command_json(capsys):
    assert main(["models", "--family", "vit", "--format", "json", "--resolution", "224"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert {"name", "family", "params", "params_without_head", "gflops", "train_gflops"} <= set(rows[0])
    assert set(by_name) == set(model_names("vit"))
    b16 = by_name["vit-b16"]
    assert round(b16["params"] / 1e6, 1) == 86.6
    assert b16["params"] - b16["params_without_head"] == (768 + 1) * 1000
    assert b16["gflops"] == pytest.approx(2 * 17.58, rel=0.01)


@pytest.mark.slow  # over ~2 s on a loaded 2-core machine: not in the quick loop
def test_models_command_table_and_csv(capsys):
    assert main(["models", "nfnet-f0", "vit-b16", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "nfnet-f0" in out and "vit-b16" in out and "FLOPs = 2 x multiply-accumulates" in out
    f0_row = next(line.split() for line in out.splitlines() if line.startswith("nfnet-f0"))
    assert f0_row[2:4] == ["68.4M", "68.4M"]  # 10 classes: the head is 31k parameters
    assert main(["models", "--family", "nfnet", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split(",")[:3] == ["name", "family", "params"]
    assert len(lines) == 1 + 16


@pytest.mark.slow  # over ~2 s on a loaded 2-core machine: not in the quick loop
@pytest.mark.parametrize(
    "args, message",
    [
        (["models", "vitb-16"], "unknown model 'vitb-16'; did you mean"),
        (["models", "vit-b16", "--resolution", "225"], "multiple"),
        (["models", "--num-classes", "0"], "--num-classes must be >= 1"),
        (["models", "nfnet-f0", "--resolution", "4"], "resolution"),
    ],
)
def test_models_command_bad_input_is_one_line_exit_2(args, message):
    code, out, err = run_cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convscale: error:")
    assert message in lines[0]
    assert "Traceback" not in err
