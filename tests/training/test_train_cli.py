"""``visionrpc train ...`` end to end: synthetic data in, a served-ready repository out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from visionrpc.cli import main
from visionrpc.server.model_config import ModelConfig, load_model_config, model_versions
from visionrpc.server.preprocess import load_image, prepare
from visionrpc.training.export import serving_model
from visionrpc.training.models import ARCHITECTURES, create_model, model_from_checkpoint
from visionrpc.training.synthetic import make_dataset
from visionrpc.training.tasks import get_task

TINY = ["--arch", "tiny", "--weights", "none", "--bs", "16", "--quiet"]


def read_config(repository: Path, name: str) -> ModelConfig:
    return load_model_config(repository / name / "config.json")


def test_make_data_then_train_pets_writes_a_model_that_matches_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, repository = tmp_path / "pets", tmp_path / "repo"
    assert main(["train", "make-data", "pets", str(data)]) == 0
    assert any((data / "images").glob("*.jpg"))
    argv = ["train", "pets", "--data", str(data), "--repository", str(repository), *TINY]
    assert main([*argv, "--size", "32", "--epochs", "2", "--lr", "1e-2"]) == 0
    printed = capsys.readouterr().out
    assert "train_loss" in printed and "error_rate" in printed

    config = read_config(repository, "pets")
    assert config.task == "classification"
    assert len(config.labels) == 10
    assert (config.input.height, config.input.width) == (32, 32)
    assert config.training.arch == "tiny"
    assert 0.0 <= config.training.metrics["error_rate"] <= 1.0
    assert model_versions(repository / "pets") == [1]
    version = repository / "pets" / "1"
    assert {p.name for p in (version / "plots").iterdir()} == {
        "predictions.png",
        "confusion_matrix.png",
    }
    # The checkpoint rebuilds the exported model: same answer for a real file.
    checkpoint = torch.load(version / "checkpoint.pt", weights_only=True)
    serving = serving_model(model_from_checkpoint(checkpoint), get_task(checkpoint["task"]))
    image_file = next((data / "images").glob("*.jpg"))
    pixels, _ = prepare(load_image(image_file.read_bytes()), config.input)
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {"images": pixels[None]})
    with torch.no_grad():
        expected = serving(torch.from_numpy(pixels[None])).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)

    assert main([*argv, "--size", "32", "--epochs", "1", "--lr", "1e-2"]) == 0
    assert model_versions(repository / "pets") == [1, 2]


def test_train_voc_stores_the_threshold_its_sweep_chose(tmp_path: Path) -> None:
    data = make_dataset("voc", tmp_path / "voc", images=40)
    argv = ["train", "voc", "--data", str(data), "--repository", str(tmp_path / "repo"), *TINY]
    assert main([*argv, "--size", "32", "--epochs", "1", "--lr", "1e-2", "--mixup", "0.4"]) == 0
    config = read_config(tmp_path / "repo", "voc")
    assert config.task == "multilabel"
    assert config.threshold == config.training.metrics["threshold"]
    assert round(config.threshold / 0.05) * 0.05 == pytest.approx(config.threshold)
    assert 0.05 <= config.threshold <= 0.95
    assert (tmp_path / "repo" / "voc" / "1" / "plots" / "threshold_sweep.png").is_file()


def test_train_biwi_without_a_rate_runs_lr_find_and_plots_points(tmp_path: Path) -> None:
    data = make_dataset("biwi", tmp_path / "biwi", people=2, frames_per_person=8)
    argv = ["train", "biwi", "--data", str(data), "--repository", str(tmp_path / "repo"), *TINY]
    assert main([*argv, "--size", "24x32", "--epochs", "1", "--name", "heads"]) == 0
    config = read_config(tmp_path / "repo", "heads")
    assert config.task == "points"
    assert config.labels == ("head_center",)
    assert (config.input.height, config.input.width) == (24, 32)
    assert config.training.metrics["point_error_px"] > 0
    plots = {p.name for p in (tmp_path / "repo" / "heads" / "1" / "plots").iterdir()}
    assert plots == {"points.png", "lr_find.png"}


def test_lr_find_prints_its_suggestions_and_writes_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset("pets", tmp_path / "pets", breeds=4, per_breed=10)
    plot = tmp_path / "lr.png"
    argv = ["train", "lr-find", "pets", "--data", str(data), "--out", str(plot), *TINY]
    assert main([*argv, "--size", "32"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert float(lines["valley"]) > 0 and float(lines["steep"]) > 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_missing_pretrained_weights_fail_with_instructions(
    tmp_path: Path, hub_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset("pets", tmp_path / "pets", breeds=2, per_breed=3)
    argv = ["train", "pets", "--data", str(data), "--repository", str(tmp_path / "repo")]
    assert main([*argv, "--arch", "resnet18"]) == 1
    error = capsys.readouterr().err
    assert str(hub_dir / "checkpoints" / "resnet18-f37072fd.pth") in error
    assert "--weights none" in error
    assert not (tmp_path / "repo").exists()


def test_mixup_for_points_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset("biwi", tmp_path / "biwi", people=2, frames_per_person=2)
    argv = ["train", "biwi", "--data", str(data), "--repository", str(tmp_path / "repo"), *TINY]
    assert main([*argv, "--mixup", "0.4"]) == 1
    assert "mixup does not apply to the points task" in capsys.readouterr().err


def test_the_cli_parser_is_built_without_importing_torch() -> None:
    code = (
        "import sys; from visionrpc.cli import build_parser; "
        "build_parser().parse_args(['train', 'pets', '--data', 'd', '--repository', 'r']); "
        "print(sorted(m for m in ('torch', 'torchvision', 'onnx') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_pretrained_weights_from_a_file_fine_tune_frozen_then_unfrozen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "tiny-body.pth"
    torch.save(create_model("tiny", 1, None).body.state_dict(), weights)
    data = make_dataset("pets", tmp_path / "pets", breeds=3, per_breed=8)
    argv = ["train", "pets", "--data", str(data), "--repository", str(tmp_path / "repo")]
    options = ["--arch", "tiny", "--weights", str(weights), "--size", "32", "--bs", "8"]
    assert main([*argv, *options, "--epochs", "1", "--freeze-epochs", "1", "--lr", "1e-2"]) == 0
    # One table per phase: the frozen epoch, then the unfrozen one with discriminative rates.
    assert capsys.readouterr().out.count("train_loss") == 2


def test_an_unknown_architecture_is_refused_with_the_registered_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset("pets", tmp_path / "pets", breeds=2, per_breed=3)
    argv = ["train", "pets", "--data", str(data), "--repository", str(tmp_path / "repo")]
    assert main([*argv, "--arch", "resnet9000"]) == 1
    error = capsys.readouterr().err
    assert "unknown architecture 'resnet9000'" in error
    assert all(name in error for name in ARCHITECTURES) and "timm:" in error


def test_every_setting_of_train_config_is_a_flag_with_its_type_and_default() -> None:
    from visionrpc.cli import build_parser
    from visionrpc.training.cli import config_from_args
    from visionrpc.training.config import TrainConfig, flag_of

    argv = ["train", "biwi", "--data", "d", "--repository", "r"]
    defaults = config_from_args(build_parser().parse_args(argv))
    assert defaults == TrainConfig(kind="biwi", data=Path("d"), repository=Path("r"))
    flags = ["--min-scale", "0.5", "--max-warp", "0.1", "--size", "24x32", "--cpu-bf16"]
    flags += ["--no-mixed-precision", "--name", "heads", "--valid-person", "1"]
    chosen = config_from_args(build_parser().parse_args([*argv, *flags]))
    assert (chosen.min_scale, chosen.max_warp, chosen.size) == (0.5, 0.1, (24, 32))
    assert not chosen.mixed_precision and chosen.cpu_bf16
    assert (chosen.model_name, chosen.valid_person) == ("heads", "1")
    assert flag_of("model_name") == "--name" and flag_of("min_scale") == "--min-scale"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--min-scale", "big"])


def test_voc_whose_rows_are_all_valid_is_refused_with_the_remedy_then_trains_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset("voc", tmp_path / "voc", images=24)
    lines = (data / "train.csv").read_text().splitlines()
    rows = [line.rsplit(",", 1)[0] + ",True" for line in lines[1:]]
    (data / "train.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    argv = ["train", "voc", "--data", str(data), "--repository", str(tmp_path / "repo"), *TINY]
    options = ["--size", "24", "--epochs", "1", "--lr", "1e-2"]
    assert main([*argv, *options]) == 1
    error = capsys.readouterr().err
    assert "is_valid=True" in error and "--valid-pct" in error and "Traceback" not in error
    assert main([*argv, *options, "--valid-pct", "0.25"]) == 0
    training = read_config(tmp_path / "repo", "voc").training
    assert (training.dataset_kind, training.dataset) == ("voc", str(data))
    assert training.dataset_options == {"valid_pct": 0.25, "seed": 42}


def test_a_split_option_of_another_kind_and_a_bad_augmentation_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset("pets", tmp_path / "pets", breeds=2, per_breed=3)
    argv = ["train", "pets", "--data", str(data), "--repository", str(tmp_path / "repo"), *TINY]
    assert main([*argv, "--valid-person", "01"]) == 1
    assert "--valid-person applies to biwi only, not pets" in capsys.readouterr().err
    assert main([*argv, "--lr", "1e-2", "--min-scale", "0"]) == 1
    assert "min_scale must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["train", "demo", "--repository", "r"], "PIL", "train"),
        (["train", "make-data", "pets", "d"], "numpy", "train"),
        (["serve", "--repository", "r"], "onnxruntime", "server"),
    ],
)
def test_a_missing_module_names_the_extra_that_brings_it(
    argv: list[str], blocked: str, extra: str, tmp_path: Path
) -> None:
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {blocked!r}:\n"
        "            raise ModuleNotFoundError(f'no {name}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from visionrpc.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert f"pip install 'visionrpc[{extra}]'" in result.stderr
