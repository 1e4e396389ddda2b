"""`das-lab data verify`: summary table and exit codes on good and broken datasets."""

from __future__ import annotations

from pathlib import Path

from das_lab.cli import main as das_lab
from das_lab.data.verify import main
from fake_datasets import make_imagenet_archives, make_stanford_dogs, truncate


def _dogs_args(root: Path, tmp_path: Path) -> list[str]:
    return [
        "data=stanford_dogs",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_classes=3",
        "data.num_workers=0",
    ]


def test_good_dataset_passes_with_a_summary_table(tmp_path: Path, capsys) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    assert main(_dogs_args(fake.root, tmp_path) + ["data.crop_to_bbox=true"]) == 0
    out = capsys.readouterr().out
    assert "train images" in out and "12" in out and "0 of 6 decoded" in out and "data verify: OK" in out


def test_corrupt_image_fails_and_is_named(tmp_path: Path, capsys) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    bad = fake.root / "Images" / fake.test[0]
    truncate(bad)
    assert main(_dogs_args(fake.root, tmp_path)) == 1
    captured = capsys.readouterr()
    assert "1 of 6 decoded" in captured.out and str(bad) in captured.err


def test_max_images_decodes_a_sample(tmp_path: Path, capsys) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    assert main(["--max-images", "2"] + _dogs_args(fake.root, tmp_path)) == 0
    assert "0 of 2 decoded" in capsys.readouterr().out


def test_missing_dataset_and_wrong_class_count_fail(tmp_path: Path, capsys) -> None:
    assert main(_dogs_args(tmp_path / "absent", tmp_path)) == 1
    assert "Expected:" in capsys.readouterr().err
    fake = make_stanford_dogs(tmp_path / "dogs")
    assert main(["data=stanford_dogs", f"data.root={fake.root}", "data.num_workers=0"]) == 1
    assert "data.num_classes=120 but" in capsys.readouterr().err
    assert main(["data=stanford_dogs", f"data.root={fake.root}", "data.num_classes=0"]) == 1
    assert capsys.readouterr().err == "data verify: FAILED\ndata.num_classes=0: expected a positive integer\n"


def test_imagenet_archives_verify(tmp_path: Path, capsys) -> None:
    make_imagenet_archives(tmp_path / "imagenet", tmp_path / "staging")
    args = ["data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_classes=4", "data.num_workers=0"]
    assert main(args + [f"data.cache_dir={tmp_path / 'cache'}", "data.verify_md5=false"]) == 0
    assert "official archives" in capsys.readouterr().out
    assert main(args + [f"data.cache_dir={tmp_path / 'fresh_cache'}"]) == 1
    assert "MD5 differs" in capsys.readouterr().err


def test_empty_and_undecodable_images_are_listed_with_their_paths(tmp_path: Path, capsys) -> None:
    fake = make_stanford_dogs(tmp_path / "dogs")
    empty, text = fake.root / "Images" / fake.train[0], fake.root / "Images" / fake.test[1]
    empty.write_bytes(b"")
    text.write_text("not an image\n")
    assert das_lab(["data", "verify", *_dogs_args(fake.root, tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "1 of 12 decoded" in captured.out and "1 of 6 decoded" in captured.out
    problems = captured.err.strip().splitlines()
    assert problems[0] == "data verify: 2 problem(s):"
    assert f"  {empty}: empty file (0 bytes); replace or delete the file" in captured.err
    assert f"  {text}: cannot decode image (not a format torchvision or Pillow can read);" in captured.err
    assert len(problems) == 3 and "BytesIO" not in captured.err and "FAILED" not in captured.err


def test_group_typo_is_one_line_listing_the_options(tmp_path: Path, capsys) -> None:
    assert das_lab(["data", "verify", "data=imagenett", f"data.root={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "Could not find 'data/imagenett'; choose data= one of: ade20k, coco, digits, imagenet, stanford_dogs" in err
    assert das_lab(["data", "verify", "data=stanford_dogs", "data.no_such_key=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_key" in err
