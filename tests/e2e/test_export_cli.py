"""Post-training quantization of a model trained without QAT: ``python -m trainer.export SOURCE quantize=...``."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli
from trainer import export, models
from trainer.cli.export import main
from trainer.report import folder_bytes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    torch.manual_seed(0)
    model = models.build("gpt", vocab_size=65, n_layer=2, n_head=2, n_embd=64, block_size=32)
    return model.eval(), models.save_dense(model, tmp_path_factory.mktemp("dense") / "final")


@pytest.mark.parametrize("scheme, min_ratio, max_error", [("int8_dynamic", 2.5, 0.05), ("int4_weight", 3.5, 0.15)])
def test_post_training_quantization(tmp_path, dense, scheme, min_ratio, max_error):
    model, folder = dense
    proc = run_cli(tmp_path, str(folder), f"quantize={scheme}", f"out={tmp_path / 'q'}", module="trainer.export")
    assert "smaller than the fp32 export" in proc.stdout
    assert f"; 8 Linear weights quantized ({scheme}), 0.0% of their values zero (pruned)" in proc.stdout  # 2 x 4
    quantized = export.load(tmp_path / "q")
    assert folder_bytes(folder) / folder_bytes(tmp_path / "q") >= min_ratio
    x = torch.randint(0, 65, (2, 32))
    reference, approx = model(x), quantized(x)
    assert approx.shape == reference.shape and not torch.equal(approx, reference)
    assert (approx - reference).abs().max() < max_error * reference.abs().max()


def test_bad_arguments_are_one_line_exit_2(tmp_path, dense, capsys):
    """One as a real process (the way from ``python -m`` to the line), the others in this one."""
    _, folder = dense
    proc = run_cli(tmp_path, str(folder), "quantize=int3", module="trainer.export", check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: quantize must be one of")
    for args in ([str(tmp_path / "missing"), "quantize=int8_dynamic"], []):
        assert main(args) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["targets=nomatch.*"], "error: targets: 'nomatch.*' matches no Linear layer (the model's are e.g. blocks.0"),
        (["targets=blocks.*,head"], "error: targets: 'head' matches no Linear layer"),  # tied to the embedding
        (["out={file}/q"], "error: out: {file}/q cannot be made: {file} is a file"),
        (["out={folder}"], "error: out: {folder} already exists"),
    ],
    ids=["a pattern that matches nothing", "the tied head", "out under a file", "out over another export"],
)
def test_an_export_that_would_do_nothing_or_cannot_be_written_is_refused(tmp_path, dense, capsys, args, says):
    """``targets`` that match nothing used to write a "1.00x smaller" export that quantized nothing."""
    _, folder = dense
    (tmp_path / "a_file").write_text("not a folder")
    paths = {"file": tmp_path / "a_file", "folder": folder}
    args = [arg.format(**paths) for arg in args]
    before = sorted(tmp_path.rglob("*"))
    code = main([str(folder), "quantize=int8_weight", *args])  # in this process: the real process is tested above
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(says.format(**paths)), lines
    assert sorted(tmp_path.rglob("*")) == before and not (folder.parent / "final_int8_weight").exists()
