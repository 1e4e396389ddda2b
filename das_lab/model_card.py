"""The README.md model card of an exported model, written from the records of the run that trained it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from das_lab.utils.tables import markdown_table

TIMM_CITATION = "Ross Wightman, PyTorch Image Models (timm), 2019, https://github.com/huggingface/pytorch-image-models"


def find_run_dir(ckpt_path: str | Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), found by its metrics.json."""
    ckpt = Path(ckpt_path).expanduser().resolve()
    return next((folder for folder in ckpt.parents[:3] if (folder / "metrics.json").is_file()), None)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    final, best = metrics.get("final", {}), metrics.get("best", {})
    rows = []
    for name in sorted(set(final) | set(best)):
        split, _, short = name.partition("/")
        values = [f"{v:.4f}" if isinstance(v, (int, float)) else "n/a" for v in (final.get(name), best.get(name))]
        rows.append([short or name, split if short else "n/a", *values])
    return (
        [markdown_table(["metric", "split", "final", "best"], rows)]
        if rows
        else ["No metrics were recorded for this run."]
    )


def _recipe_lines(run_dir: Optional[Path]) -> list[str]:
    config_path = run_dir / ".hydra" / "config.yaml" if run_dir else None
    if config_path is None or not config_path.is_file():
        return ["The run's configuration (.hydra/config.yaml) was not found next to the checkpoint."]
    config = OmegaConf.load(config_path)
    lines = []
    for key in ("optimizer", "scheduler"):
        node = config.get(key)
        if node is not None:
            lines.append(f"- {key}: `{json.dumps(OmegaConf.to_container(node, resolve=False))}`")
    trainer = config.get("trainer") or {}
    for key in ("max_epochs", "precision", "accumulate_grad_batches"):
        if key in trainer:
            lines.append(f"- trainer.{key}: {trainer[key]}")
    if "seed" in config:
        lines.append(f"- seed: {config.seed}")
    return lines


def _provenance_lines(run_info: dict[str, Any]) -> list[str]:
    packages = run_info.get("packages", {})
    git = run_info.get("git") or {}
    commit = git.get("commit")
    lines = [f"- das-lab version: {packages.get('das-lab', 'unknown')}"]
    lines.append(
        f"- git commit: {commit}{' (with uncommitted changes, see git.diff)' if git.get('dirty') else ''}"
        if commit
        else "- git commit: unknown (das-lab was not run from a git checkout)"
    )
    lines += [f"- {name}: {packages[name]}" for name in ("torch", "timm", "lightning") if packages.get(name)]
    return lines


def _citations(pretrained_cfg: dict[str, Any]) -> list[str]:
    papers = []
    if pretrained_cfg.get("paper_ids"):
        ids = pretrained_cfg["paper_ids"]
        link = f", https://arxiv.org/abs/{ids.split(':', 1)[1]}" if str(ids).startswith("arXiv:") else ""
        papers.append(f"- {pretrained_cfg.get('paper_name') or ids} ({ids}{link})")
    return [*papers, f"- {TIMM_CITATION}"]


def model_card(
    out_dir: Path,
    architecture: str,
    pretrained_cfg: dict[str, Any],
    data_cfg: dict[str, Any],
    ckpt_path: str | Path,
) -> str:
    """Markdown for README.md: model, data, recipe, metrics with their split, provenance, reproduction, citations."""
    run_dir = find_run_dir(ckpt_path)
    metrics = _read_json(run_dir / "metrics.json") if run_dir else {}
    run_info = _read_json(run_dir / "run_info.json") if run_dir else {}
    gflops = metrics.get("gflops")
    size = pretrained_cfg.get("input_size", ("?", "?", "?"))
    overrides = " ".join(shlex.quote(o) for o in metrics.get("overrides", []))
    data = {
        key: value
        for key, value in data_cfg.items()
        if key not in ("batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
    }
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, das-lab]",
        f"license: {pretrained_cfg.get('license', 'other')}",
        "---",
        f"# {architecture} trained with das-lab",
        "",
        f"Exported from `{Path(ckpt_path).name}`"
        + (f" of the run folder `{run_dir.name}`." if run_dir else " (no run records were found beside it)."),
        "",
        "## Model",
        f"- architecture: `{architecture}` ({pretrained_cfg.get('num_classes')} classes)",
        f"- parameters: {metrics.get('params', 'n/a')}",
        f"- GFLOPs (MACs, batch 1, {size[1]}x{size[2]}): {gflops if gflops is not None else 'n/a'}",
        f"- input: {size[1]}x{size[2]}, mean {pretrained_cfg.get('mean')}, std {pretrained_cfg.get('std')}, "
        f"crop_pct {pretrained_cfg.get('crop_pct')}, {pretrained_cfg.get('interpolation')} resize",
        "",
        "## Data",
        f"- `{data.pop('_target_', 'unknown')}`",
        *(f"- {key}: {value}" for key, value in data.items()),
        "",
        "## Recipe",
        *_recipe_lines(run_dir),
        "",
        "## Metrics",
        *_metric_rows(metrics),
        "",
        "## Provenance",
        *_provenance_lines(run_info),
        "",
        "## Reproduce",
        "```bash",
        *([f"git checkout {run_info['git']['commit']}"] if (run_info.get("git") or {}).get("commit") else []),
        f"das-lab train {overrides}".rstrip(),
        "```",
        "",
        "## Use",
        "```python",
        "import das_lab  # registers das-lab's models in timm",
        "import timm",
        f'model = timm.create_model("local-dir:{out_dir.name}", pretrained=True).eval()',
        "```",
        "",
        "## Citation",
        *_citations(pretrained_cfg),
        "",
    ]
    return "\n".join(lines)
