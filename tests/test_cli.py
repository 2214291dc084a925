import argparse

import pytest
import torch

from instantcharacter.__main__ import main

def test_generate_on_tiny_models_writes_images(tiny_models, tmp_path, capsys):
    models = tiny_models["flux"].parents[1]
    code = main(["--models-dir", str(models), "generate", "--prompt", "a girl on a bike", "--width", "64",
                 "--height", "48", "--steps", "2", "--batch-size", "2", "--dtype", "fp32", "--fit", "pad",
                 "--output-dir", str(tmp_path)])
    assert code == 0
    from PIL import Image

    written = sorted(tmp_path.glob("*.png"))
    assert len(written) == 2 and all(Image.open(p).size == (64, 48) for p in written)
    assert "step 2/2" in capsys.readouterr().out


def test_missing_models_are_listed_with_where_they_go(tmp_path, capsys):
    code = main(["--models-dir", str(tmp_path), "generate", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "black-forest-labs/FLUX.1-dev: missing" in err and str(tmp_path / "unet" / "FLUX.1-dev") in err
    assert "instantcharacter_ip-adapter.bin" in err and "--download" in err


def test_doctor_reports_models_and_offload(tiny_models, capsys):
    models = tiny_models["flux"].parents[1]
    assert main(["--models-dir", str(models), "doctor"]) == 0
    out = capsys.readouterr().out
    assert "recommended offload:" in out
    assert out.count("[ok]") == 4


def test_budget_without_a_budget_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--models-dir", str(tmp_path), "generate", "--offload", "budget"])
    assert info.value.code == 2
    assert "--offload budget needs --vram-budget" in capsys.readouterr().err


def test_cli_refuses_character_and_reference_together(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--models-dir", str(tmp_path), "generate", "--character", "a.safetensors", "--reference", "b.png"])
    assert "--character and --reference" in capsys.readouterr().err


def test_cli_names_a_bad_character_file_before_looking_for_models(tmp_path, capsys):
    bad = tmp_path / "girl.pt"
    torch.save({"low_res_deep": torch.zeros(1, 729, 8)}, bad)
    assert main(["--models-dir", str(tmp_path), "generate", "--character", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "PyTorch pickle" in err and "Models not found" not in err


def test_save_character_needs_a_safetensors_name_before_anything_loads(tmp_path, capsys):
    assert main(["--models-dir", str(tmp_path), "generate", "--save-character", str(tmp_path / "girl.pt")]) == 2
    err = capsys.readouterr().err
    assert "ending in .safetensors" in err and "Models not found" not in err
    assert not (tmp_path / "girl.pt").exists()


def test_every_option_has_help_and_shows_its_default(monkeypatch, capsys):
    """``--help`` of every command explains every option and shows each default worth showing."""
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main(["doctor"])
    top = parsers[0]
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"generate", "doctor"} <= set(commands)
    for name, parser in [("", top), *commands.items()]:
        text = " ".join(parser.format_help().split())
        assert "``" not in text, f"{name or 'the top'} --help shows the docstring's markup"
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1]
            assert action.help and len(action.help) > 10, f"{name} {flag} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, f"{name} {flag}: its default is not shown"
    assert "(default: 28)" in " ".join(commands["generate"].format_help().split())
