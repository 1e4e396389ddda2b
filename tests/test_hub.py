"""``das-lab export ... push_to_hub=ORG/NAME``: the exported folder reaches the Hub (a local stand-in of its API)
byte for byte; without a token or a reachable Hub, one line and the folder stays."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from huggingface_hub import constants

from cli_helpers import error_line
from das_lab.export import main as export_main
from hub_server import serve_hub

TOKEN = "hf_stand_in_token"


@pytest.fixture()
def hub_env(tmp_path, monkeypatch):
    """No token anywhere (environment, token file, OIDC) and the Hub's address at the stand-in's or a closed port."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"), raising=False)
    return monkeypatch


@pytest.fixture()
def hub(hub_env):
    server = serve_hub()
    record = next(server)
    hub_env.setattr(constants, "ENDPOINT", record.url)
    yield record
    server.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_push_to_hub_uploads_the_exported_folder(tiny_checkpoint, hub, hub_env, tmp_path, capsys):
    _, ckpt = tiny_checkpoint
    hub_env.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "hub"
    args = [
        f"ckpt_path={ckpt}",
        f"out={out}",
        "push_to_hub=my-lab/das-tiny",
        "private=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert export_main(args) == 0, capsys.readouterr().err[-3000:]
    assert f"uploaded to the Hub: {hub.url}/my-lab/das-tiny/commit/" in capsys.readouterr().out

    assert hub.unexpected == []
    assert hub.created == [{"name": "das-tiny", "organization": "my-lab", "visibility": "private"}]
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    (commit,) = hub.commits
    assert commit["repo"] == "my-lab/das-tiny" and commit["revision"] == "main"
    exported = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(exported) == ["README.md", "config.json", "model.safetensors"]
    assert commit["files"] == exported
    assert hub.validated == [exported["README.md"].decode()]


def test_missing_token_or_unreachable_hub_is_one_line_and_keeps_the_folder(tiny_checkpoint, hub_env, tmp_path, capsys):
    _, ckpt = tiny_checkpoint
    run = tmp_path / "run"
    out = tmp_path / "a"
    line = error_line(export_main, [f"ckpt_path={ckpt}", f"out={out}", "push_to_hub=my-lab/das-tiny"], run, capsys)
    assert line == (
        "das-lab: error: push_to_hub=my-lab/das-tiny needs a Hugging Face token: set HF_TOKEN or run `hf auth login`; "
        f"the export stays in {out}; upload it later with `hf upload my-lab/das-tiny {out} .`"
    )
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    hub_env.setenv("HF_TOKEN", TOKEN)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    hub_env.setattr(constants, "ENDPOINT", endpoint)
    out = tmp_path / "b"
    line = error_line(
        export_main, [f"ckpt_path={ckpt}", f"out={out}", "push_to_hub=my-lab/das-tiny"], run / "2", capsys
    )
    assert line.startswith(f"das-lab: error: push_to_hub=my-lab/das-tiny: upload to {endpoint} failed (")
    assert line.endswith(f"; the export stays in {out}; upload it later with `hf upload my-lab/das-tiny {out} .`")
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_bad_repo_id_or_format_is_refused_before_exporting(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    line = error_line(export_main, ["ckpt_path=x.ckpt", f"out={out}", "push_to_hub=das-tiny"], run, capsys)
    assert line == (
        "das-lab: error: push_to_hub=das-tiny: not a Hub repository id (expected one '/' between owner "
        "and name); give ORG/NAME, e.g. push_to_hub=my-lab/das-r50"
    )
    line = error_line(export_main, ["ckpt_path=x.ckpt", f"out={out}", "push_to_hub=my lab/x"], run, capsys)
    assert line.startswith("das-lab: error: push_to_hub=my lab/x: not a Hub repository id (")
    line = error_line(export_main, ["ckpt_path=x.ckpt", f"out={out}", "format=onnx", "push_to_hub=a/b"], run, capsys)
    assert (
        line
        == "das-lab: error: push_to_hub uploads timm folders; drop push_to_hub or export with format=timm (not format=onnx)"
    )
    assert not Path(out).exists()
