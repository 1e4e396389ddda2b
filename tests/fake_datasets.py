"""Tiny copies of Stanford Dogs and ImageNet in their real on-disk formats, for tests of any module.

Images are small solid-colour JPEGs whose red channel encodes the class (``class_colour``), with
the quirks of the real releases: a CMYK JPEG, a grayscale JPEG and a PNG named ``.jpg``/``.JPEG``.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

DOG_BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog")
IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")
IMAGE_SIZE = (48, 40)  # width, height


def class_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour of every image of class ``label`` (red = 40 + 60 * label)."""
    return 40 + 60 * label, 128, 200


def write_image(path: Path, label: int, kind: str = "rgb", size: tuple[int, int] = IMAGE_SIZE) -> None:
    """An image of class ``label``; kind: rgb | cmyk | gray (JPEG) | png (PNG bytes, any name) | rgba (PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, class_colour(label))
    if kind == "cmyk":
        image.convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "gray":
        image.convert("L").save(path, format="JPEG", quality=95)
    elif kind == "png":
        image.save(path, format="PNG")
    elif kind == "rgba":
        image.convert("RGBA").save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=95)


def truncate(path: Path) -> None:
    """Cut a file to half its length, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cells(strings: list[str]) -> np.ndarray:
    cells = np.empty((len(strings), 1), dtype=object)
    for i, string in enumerate(strings):
        cells[i, 0] = np.array([string])
    return cells


def _voc_xml(filename: str, name: str, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> str:
    objects = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation><folder>02085620</folder><filename>{filename}</filename><source><database>ImageNet database</database>"
        f"</source><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<segment>0</segment>{objects}</annotation>"
    )


@dataclass
class FakeDogs:
    """What ``make_stanford_dogs`` wrote."""

    root: Path
    train: list[str]  # relative image paths ('<breed folder>/<file>.jpg')
    test: list[str]
    boxes: dict[str, tuple[int, int, int, int]]  # union box per relative image path
    two_object_image: str


def make_stanford_dogs(root: Path, train_per_class: int = 4, test_per_class: int = 2) -> FakeDogs:
    """The extracted Stanford Dogs release (Images/, Annotation/, *_list.mat) for DOG_BREEDS."""
    train, test, labels = [], [], {}
    boxes: dict[str, tuple[int, int, int, int]] = {}
    kinds = {(0, 0): "cmyk", (1, 1): "gray", (2, 0): "png"}
    for label, folder in enumerate(DOG_BREEDS):
        wnid = folder.split("-")[0]
        for n in range(train_per_class + test_per_class):
            relative = f"{folder}/{wnid}_{100 + n}.jpg"
            write_image(root / "Images" / relative, label, kinds.get((label, n), "rgb"))
            box_list = [(4 + n, 6, 30 + n, 33)]
            if (label, n) == (1, 0):
                box_list.append((2, 3, 20, 25))
            x0, y0, x1, y1 = zip(*box_list)
            boxes[relative] = (min(x0), min(y0), max(x1), max(y1))
            annotation = root / "Annotation" / relative.rsplit(".", 1)[0]
            annotation.parent.mkdir(parents=True, exist_ok=True)
            annotation.write_text(_voc_xml(annotation.name, folder.split("-", 1)[1], IMAGE_SIZE, box_list))
            (train if n < train_per_class else test).append(relative)
            labels[relative] = label + 1
    for name, files in (("train_list", train), ("test_list", test), ("file_list", train + test)):
        scipy.io.savemat(
            root / f"{name}.mat",
            {
                "file_list": _cells(files),
                "annotation_list": _cells([f.rsplit(".", 1)[0] for f in files]),
                "labels": np.array([[labels[f]] for f in files], dtype=np.uint8),
            },
        )
    return FakeDogs(root, train, test, boxes, f"{DOG_BREEDS[1]}/{DOG_BREEDS[1].split('-')[0]}_100.jpg")


def make_stanford_dogs_archives(root: Path, staging: Path) -> FakeDogs:
    """images.tar, annotation.tar and lists.tar in ``root`` (the release as downloaded)."""
    dogs = make_stanford_dogs(staging)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "images.tar", "w") as tar:
        tar.add(staging / "Images", arcname="Images")
    with tarfile.open(root / "annotation.tar", "w") as tar:
        tar.add(staging / "Annotation", arcname="Annotation")
    with tarfile.open(root / "lists.tar", "w") as tar:
        for name in ("train_list.mat", "test_list.mat", "file_list.mat"):
            tar.add(staging / name, arcname=name)
    return FakeDogs(root, dogs.train, dogs.test, dogs.boxes, dogs.two_object_image)


def make_imagenet_folders(root: Path, train_per_class: int = 3, val_per_class: int = 2) -> Path:
    """The folder layout train/<wnid>/*.JPEG, val/<wnid>/*.JPEG with one PNG named .JPEG and a CMYK JPEG."""
    for label, wnid in enumerate(IMAGENET_WNIDS):
        for n in range(train_per_class):
            kind = "png" if (label, n) == (0, 0) else "cmyk" if (label, n) == (1, 0) else "rgb"
            write_image(root / "train" / wnid / f"{wnid}_{n}.JPEG", label, kind)
        for n in range(val_per_class):
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{label * val_per_class + n + 1:08d}.JPEG", label)
    return root


def devkit_ids() -> dict[str, int]:
    """ILSVRC2012_ID of each fake wnid: reverse sorted order, so ID order != class-index order."""
    return {wnid: len(IMAGENET_WNIDS) - i for i, wnid in enumerate(IMAGENET_WNIDS)}


def _meta_mat(words: dict[str, str]) -> bytes:
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    ids = devkit_ids()
    rows = [(ids[w], w, words[w], "a fish", 0, np.zeros((1, 0)), 0, 1300) for w in IMAGENET_WNIDS]
    rows.append((len(IMAGENET_WNIDS) + 1, "n01439121", "cyprinid", "a parent synset", 2, np.array([[4, 3]]), 1, 2600))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(sorted(rows)):
        synsets[i, 0] = row
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_imagenet_archives(root: Path, staging: Path, train_per_class: int = 3, val_per_class: int = 2) -> list[int]:
    """The three official archives in ``root``; returns the class index of each val image in file order."""
    words = {
        w: f"{name}, {latin}"
        for w, (name, latin) in zip(
            IMAGENET_WNIDS,
            [
                ("tench", "Tinca tinca"),
                ("goldfish", "Carassius auratus"),
                ("great white shark", "Carcharodon"),
                ("tiger shark", "Galeocerdo"),
            ],
        )
    }
    make_imagenet_folders(staging, train_per_class, val_per_class)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in IMAGENET_WNIDS:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for image in sorted((staging / "train" / wnid).iterdir()):
                    inner.add(image, arcname=image.name)
            _add_bytes(outer, f"{wnid}.tar", buffer.getvalue())
    val_images = sorted((p for p in (staging / "val").rglob("*.JPEG")), key=lambda p: p.name)
    ids = devkit_ids()
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for image in val_images:
            tar.add(image, arcname=image.name)
    truth = "".join(f"{ids[image.parent.name]}\n" for image in val_images)
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat(words))
        _add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth.encode())
        _add_bytes(tar, "ILSVRC2012_devkit_t12/COPYING", b"devkit\n")
    shutil.rmtree(staging)
    return [IMAGENET_WNIDS.index(image.parent.name) for image in val_images]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime, to prove a run wrote nothing there."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}
