"""Weights files: every accepted format loads, and every mismatch is reported with a hint."""

import pickle

import pytest
import torch
from torch import nn

from das_lab.models.weights import WeightsMismatchError, load_weights, read_state_dict


class Net(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)


def _source() -> Net:
    torch.manual_seed(1)
    net = Net()
    with torch.no_grad():
        net.bn1.running_mean.uniform_()
    return net


def _lightning_ckpt(state):
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {**{f"net.{k}": v for k, v in state.items()}, "criterion.weight": torch.ones(5)},
        "optimizer_states": [],
        "hyper_parameters": {"lr": 0.1},
    }


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model": s},
        lambda s: {"state_dict": s},
        _lightning_ckpt,
        lambda s: {f"module.{k}": v for k, v in s.items()},
    ],
    ids=["raw", "model", "state_dict", "lightning", "ddp"],
)
def test_accepted_formats_load_every_tensor(tmp_path, wrap):
    source = _source()
    path = tmp_path / "w.ckpt"
    torch.save(wrap(source.state_dict()), path)
    target = Net()
    report = load_weights(target, path)
    assert report.clean and sorted(report.loaded) == sorted(source.state_dict())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_shape_mismatch_names_keys_and_hints(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_source().state_dict(), path)
    target = Net(num_classes=3)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(target, path)
    message = str(err.value)
    assert "fc.weight file [5, 4] vs model [3, 4]" in message and "fc.bias file [5] vs model [3]" in message
    assert "model.num_classes" in message and "strict=False" in message
    assert [k for k, _, _ in err.value.report.mismatched] == ["fc.weight", "fc.bias"]

    fresh_fc = target.fc.weight.clone()
    report = load_weights(target, path, strict=False)
    assert [k for k, _, _ in report.mismatched] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(target.fc.weight, fresh_fc)
    torch.testing.assert_close(target.conv1.weight, _source().conv1.weight)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    state = _source().state_dict()
    del state["bn1.weight"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(
        WeightsMismatchError,
        match=r"(?s)missing from the file: bn1\.weight.*unexpected \(not in the model\): extra\.weight",
    ):
        load_weights(Net(), path)
    report = load_weights(Net(), path, new_modules=["bn1"], strict=False)
    assert report.expected_missing == ["bn1.weight"] and report.missing == []
    assert report.unexpected == ["extra.weight"]


def test_new_modules_do_not_fail_a_strict_load(tmp_path):
    state = _source().state_dict()
    path = tmp_path / "w.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("bn1.")}, path)
    report = load_weights(Net(), path, new_modules=["bn1"])
    assert report.clean and sorted(report.expected_missing) == sorted(k for k in state if k.startswith("bn1."))


def test_a_file_matching_nothing_fails_even_non_strict(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(
        WeightsMismatchError,
        match=r"other\.pth: no key fits this model \(file has e\.g\. 'weight', "
        r"the model expects e\.g\. 'conv1\.weight'\)",
    ) as err:
        load_weights(Net(), path, strict=False)
    assert "\n" not in str(err.value)


def test_a_filter_maps_a_foreign_layout_before_the_comparison(tmp_path):
    path = tmp_path / "renamed.pth"
    state = Net().state_dict()
    torch.save({f"backbone.{k}": v for k, v in state.items()}, path)
    rename = lambda sd, model: {k.removeprefix("backbone."): v for k, v in sd.items()}  # noqa: E731
    report = load_weights(Net(), path, filter_fn=rename)
    assert report.clean and len(report.loaded) == len(state)


class Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Payload()}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"holds pickled Python objects besides tensors, so it is not loaded"):
        read_state_dict(path)


def test_files_without_tensors_and_missing_files_are_explained(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 1}, path)
    with pytest.raises(ValueError, match="holds no state_dict: expected a dict of tensors"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="does not exist; check model.checkpoint"):
        read_state_dict(tmp_path / "nope.pth")
