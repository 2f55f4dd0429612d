"""Checkpoint faults in one process: corrupt files are named and skipped, another model is refused, a write
error leaves the previous checkpoint as it was."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer import checkpoint, models

GPT = {"vocab_size": 16, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16}


def make_student(**changes) -> tuple[nn.ModuleDict, torch.optim.Optimizer]:
    torch.manual_seed(0)
    wrapper = nn.ModuleDict({"student": models.build("gpt", **{**GPT, **changes})})
    return wrapper, torch.optim.AdamW(wrapper.parameters(), lr=1e-3)


def train_one_step(wrapper: nn.ModuleDict, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randint(0, GPT["vocab_size"], (2, GPT["block_size"]))
    wrapper["student"](x).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def save(root: Path, step: int, wrapper: nn.ModuleDict, optimizer: torch.optim.Optimizer) -> Path:
    return checkpoint.save(
        root,
        step,
        model=wrapper,
        optimizer=optimizer,
        extra={"marker": {"step": torch.tensor(step)}},
        model_spec=models.model_spec(wrapper["student"]),
        keep_last=3,
    )


def weights(wrapper: nn.ModuleDict) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in wrapper.state_dict().items()}


@pytest.fixture
def two_checkpoints(tmp_path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """Checkpoints of steps 1 and 2 under tmp_path/ckpt, and the weights each holds."""
    wrapper, optimizer = make_student()
    saved = {}
    for step in (1, 2):
        train_one_step(wrapper, optimizer)
        save(tmp_path / "ckpt", step, wrapper, optimizer)
        saved[step] = weights(wrapper)
    return tmp_path / "ckpt", saved


def load_newest(root: Path, **changes):
    wrapper, optimizer = make_student(**changes)
    path, extra, skipped = checkpoint.load_newest(
        checkpoint.list_complete(root),
        model=wrapper,
        optimizer=optimizer,
        extra_template={"marker": {"step": torch.tensor(0)}},
        model_spec=models.model_spec(wrapper["student"]),
    )
    return path, extra, skipped, wrapper


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_holds_every_file_with_its_size_and_hash(two_checkpoints):
    root, _ = two_checkpoints
    path = checkpoint.step_dir(root, 2)
    files = json.loads((path / checkpoint.MANIFEST_FILE).read_text())["files"]
    on_disk = {p.name for p in path.iterdir()} - {checkpoint.MANIFEST_FILE}
    assert set(files) == on_disk and "__0_0.distcp" in files
    for name, entry in files.items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert entry["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()


def truncate_tensor_file(path: Path) -> str:
    (tensors,) = path.glob("*.distcp")
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    return tensors.name


def flip_a_bit_of_the_tensor_file(path: Path) -> str:
    """One bit in the middle of the tensor data: same size, and DCP would read it without complaint."""
    (tensors,) = path.glob("*.distcp")
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0x01
    tensors.write_bytes(bytes(data))
    return tensors.name


def garble_metadata(path: Path) -> str:
    data = bytearray((path / checkpoint.METADATA_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    (path / checkpoint.METADATA_FILE).write_bytes(bytes(data))
    return checkpoint.METADATA_FILE


def garble_trainer_state(path: Path) -> str:
    (path / checkpoint.STATE_FILE).write_text('{"step": 2, "data": ')
    return checkpoint.STATE_FILE


@pytest.mark.parametrize(
    "corrupt", [truncate_tensor_file, flip_a_bit_of_the_tensor_file, garble_metadata, garble_trainer_state]
)
def test_corrupt_newest_is_named_and_the_previous_one_loads(two_checkpoints, corrupt):
    root, saved = two_checkpoints
    name = corrupt(checkpoint.step_dir(root, 2))
    path, extra, skipped, wrapper = load_newest(root)
    assert path == checkpoint.step_dir(root, 1)
    assert int(extra["marker"]["step"]) == 1 and extra["step"] == 1
    assert len(skipped) == 1 and str(checkpoint.step_dir(root, 2) / name) in skipped[0], skipped
    for key, tensor in weights(wrapper).items():
        assert torch.equal(tensor, saved[1][key]), key


def test_checkpoint_without_manifest_reports_an_unreadable_tensor_file(two_checkpoints):
    """A checkpoint written before manifests existed: the truncation surfaces as DCP's read error, caught."""
    root, _ = two_checkpoints
    newest = checkpoint.step_dir(root, 2)
    (newest / checkpoint.MANIFEST_FILE).unlink()
    truncate_tensor_file(newest)
    path, _, skipped, _ = load_newest(root)
    assert path == checkpoint.step_dir(root, 1)
    assert skipped[0].startswith(f"{newest} could not be read (") and "\n" not in skipped[0]


def test_no_usable_checkpoint_is_an_error_and_nothing_is_deleted(two_checkpoints):
    root, _ = two_checkpoints
    truncate_tensor_file(checkpoint.step_dir(root, 2))
    garble_trainer_state(checkpoint.step_dir(root, 1))
    before = snapshot(root)
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint") as error:
        load_newest(root)
    assert "step_0000002/__0_0.distcp" in str(error.value) and "step_0000001/trainer_state.json" in str(error.value)
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("changes", "difference"),
    [
        ({"n_embd": 32}, "n_embd 16 there, 32 here"),
        ({"n_layer": 2, "n_head": 4}, "n_head 2 there, 4 here, n_layer 1 there, 2 here"),
    ],
)
def test_checkpoint_of_another_model_is_refused_before_any_tensor_is_read(two_checkpoints, changes, difference):
    root, _ = two_checkpoints
    before = snapshot(root)
    with pytest.raises(checkpoint.ModelMismatch, match=difference):
        load_newest(root, **changes)
    assert snapshot(root) == before


def test_checkpoint_of_another_arch_is_refused(two_checkpoints):
    root, _ = two_checkpoints
    torch.manual_seed(0)
    mlp = models.build("mlp", in_dim=64, n_classes=10, hidden=[32], dropout=0.0)
    with pytest.raises(checkpoint.ModelMismatch, match="arch gpt there, mlp here"):
        checkpoint.check_model(checkpoint.step_dir(root, 2), models.model_spec(mlp))


def fail_writes(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["tensors", "json"])
def test_write_error_keeps_the_previous_checkpoint(two_checkpoints, monkeypatch, where):
    """Disk full while DCP writes the tensors (inside DCP's writer) or while the JSON files are written."""
    root, saved = two_checkpoints
    before = snapshot(root)
    wrapper, optimizer = make_student()
    train_one_step(wrapper, optimizer)
    monkeypatch.setattr(torch, "save", fail_writes) if where == "tensors" else monkeypatch.setattr(
        checkpoint, "_write_json", fail_writes
    )
    with pytest.raises(checkpoint.CheckpointWriteError) as error:
        save(root, 3, wrapper, optimizer)
    monkeypatch.undo()
    message = str(error.value)
    assert "\n" not in message and "step_0000003" in message and "No space left on device" in message, message
    assert f"the newest checkpoint is still {checkpoint.step_dir(root, 2)}" in message
    assert snapshot(root) == before and not list(root.glob(".tmp-*"))
    path, _, skipped, loaded = load_newest(root)
    assert path == checkpoint.step_dir(root, 2) and not skipped
    assert all(torch.equal(tensor, saved[2][key]) for key, tensor in weights(loaded).items())


def test_checkpoint_of_another_run_is_refused_before_any_tensor_is_read(tmp_path):
    wrapper, optimizer = make_student()
    spec = models.model_spec(wrapper["student"])
    identity = {"train.seed": 1, "data": "synthetic-16-100"}
    path = checkpoint.save(
        tmp_path, 1, model=wrapper, optimizer=optimizer, extra={"run": identity}, model_spec=spec, keep_last=1
    )
    other, optimizer = make_student()
    with torch.no_grad():
        other["student"].pos_emb.weight.zero_()
    for changed, difference in [({"train.seed": 2}, "train.seed 1 there, 2 here"), ({"data": "x"}, "data synthetic")]:
        with pytest.raises(checkpoint.RunChanged, match=difference):
            checkpoint.load_newest(
                [path],
                model=other,
                optimizer=optimizer,
                extra_template={},
                model_spec=spec,
                run_identity={**identity, **changed},
            )
        assert not other["student"].pos_emb.weight.any()  # nothing was read
    checkpoint.load_newest([path], model=other, optimizer=optimizer, extra_template={}, model_spec=spec)
    assert other["student"].pos_emb.weight.any()


def test_a_second_ctrl_c_inside_a_write_is_an_interrupt_not_a_disk_fault(two_checkpoints, monkeypatch):
    """DCP wraps a KeyboardInterrupt raised while writing as a write failure; it used to read like a disk fault."""
    root, _ = two_checkpoints
    wrapper, optimizer = make_student()
    before = snapshot(root)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(root, 3, wrapper, optimizer)
    assert snapshot(root) == before and not list(root.glob(".tmp-*"))


def test_a_hugging_face_spec_matches_whatever_dtype_or_folder_it_was_read_from(tmp_path):
    """A checkpoint's spec records the trained model's dtype (float32) and folder; the config's, the teacher's dtype
    (bfloat16, as released models say) or none, and maybe another folder: the same model. Other sizes are not."""
    spec = {"arch": "hf_llama", "config": {"path": "a", "hf_config": {"dtype": "float32", "hidden_size": 64}}}
    (tmp_path / checkpoint.MODEL_FILE).write_text(json.dumps(spec))
    same = {"arch": "hf_llama", "config": {"path": "b", "hf_config": {"dtype": "bfloat16", "hidden_size": 64}}}
    checkpoint.check_model(tmp_path, same)
    other = {"arch": "hf_llama", "config": {"path": "a", "hf_config": {"dtype": "float32", "hidden_size": 32}}}
    with pytest.raises(checkpoint.ModelMismatch, match=r"\(hf_config.hidden_size 64 there, 32 here\): resume"):
        checkpoint.check_model(tmp_path, other)
