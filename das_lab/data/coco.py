"""COCO 2017 object detection and instance segmentation, read from the downloaded folders.

Expected layout under ``root``: ``train2017/``, ``val2017/`` (JPEGs) and
``annotations/instances_{train,val}2017.json``. Images leave the datamodule at their original
size as float tensors in [0, 1]; resizing (shorter side ``task.min_size``, longer side at most
``task.max_size``) and mean/std normalisation happen once, inside the detector's
``GeneralizedRCNNTransform``, which also maps predicted boxes back to original image pixels.

Categories keep their COCO ids (1..90, with gaps) in the annotation files; the models see
contiguous labels 1..K (0 is background) in the order of the file's ``categories`` list, and
``category_ids[label - 1]`` maps a label back for evaluation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from faster_coco_eval import COCO
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from das_lab.data.datamodule import DataModuleBase
from das_lab.data.decode import read_rgb

Target = dict[str, Any]

_REQUIRED = {
    "images": ("id", "file_name"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def load_annotations(path: Path, with_masks: bool) -> dict[str, Any]:
    """Read an instances JSON and check the keys training and evaluation rely on.

    Fails here, at setup, naming the file, the entry and the missing or wrong key, rather than
    deep inside a data-loader worker.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file not found: {path}; expected <data.root>/annotations/instances_<split>.json "
            "as in the official annotations_trainval2017.zip"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            dataset = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); re-download or re-extract the annotations") from error
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); COCO annotation files are UTF-8 JSON, "
            "re-download or re-extract the annotations"
        ) from error
    if not isinstance(dataset, dict):
        raise ValueError(f"{path}: expected a JSON object with images, annotations and categories")
    for section, keys in _REQUIRED.items():
        entries = dataset.get(section)
        if not isinstance(entries, list):
            raise ValueError(
                f"{path}: missing list '{section}'; a COCO instances file has images, annotations, categories"
            )
        required = keys + (("segmentation",) if with_masks and section == "annotations" else ())
        for index, entry in enumerate(entries):
            missing = [key for key in required if key not in entry]
            if missing:
                raise ValueError(
                    f"{path}: {section}[{index}] has no '{missing[0]}' (required keys: {', '.join(required)})"
                )
    image_ids = {image["id"] for image in dataset["images"]}
    category_ids = {category["id"] for category in dataset["categories"]}
    for index, annotation in enumerate(dataset["annotations"]):
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{path}: annotations[{index}]['bbox']={bbox!r}; expected [x, y, width, height] numbers")
        if annotation["image_id"] not in image_ids:
            raise ValueError(f"{path}: annotations[{index}]['image_id']={annotation['image_id']} is not in 'images'")
        if annotation["category_id"] not in category_ids:
            raise ValueError(
                f"{path}: annotations[{index}]['category_id']={annotation['category_id']} is not in 'categories'"
            )
    return dataset


def prepare_ground_truth(dataset: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a COCO annotation dict that COCOeval scores correctly.

    Adds an ``info`` entry (pycocotools' ``loadRes`` copies it), ``iscrowd`` (0) and ``area``
    (the box area) where missing, and renumbers annotation ids from 1 when any id is missing,
    below 1 or repeated: COCOeval treats a match with annotation id 0 as no match, which silently
    lowers AP. The copy is deep because COCOeval rewrites segmentations in place.
    """
    prepared = copy.deepcopy(dataset)
    prepared.setdefault("info", {"description": "das-lab ground truth"})
    prepared.setdefault("licenses", [])
    annotations = prepared.setdefault("annotations", [])
    ids = [annotation.get("id") for annotation in annotations]
    valid_ids = all(isinstance(i, int) and i >= 1 for i in ids) and len(set(ids)) == len(ids)
    for index, annotation in enumerate(annotations):
        if not valid_ids:
            annotation["id"] = index + 1
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation:
            _, _, width, height = annotation["bbox"]
            annotation["area"] = float(width * height)
    return prepared


def usable_for_training(annotation: dict[str, Any]) -> bool:
    """Whether an annotation can be a training box: not a crowd region, at least 1 pixel each way."""
    _, _, width, height = annotation["bbox"]
    return not annotation.get("iscrowd", 0) and width >= 1 and height >= 1


class CocoImages(CocoDetection):
    """torchvision's CocoDetection over a pre-validated index and a chosen list of image ids.

    Skips CocoDetection's own constructor, which would parse the JSON file a second time, and
    reads images through das-lab's decoder so that a corrupt file is reported with its path.
    """

    def __init__(
        self, image_dir: Path, coco: COCO, image_ids: Sequence[int], transforms: Optional[Callable] = None
    ) -> None:
        super(CocoDetection, self).__init__(str(image_dir), transforms=transforms)
        self.coco = coco
        self.ids = list(image_ids)

    def _load_image(self, id: int) -> torch.Tensor:
        return read_rgb(Path(self.root) / self.coco.loadImgs(id)[0]["file_name"])


class CocoTargets:
    """Turns the v2 wrapper's target into the torchvision detectors' format.

    Maps category ids to contiguous labels, drops crowd regions and degenerate boxes when
    ``drop_crowd`` (training), and gives images without annotations empty ``boxes``/``labels``
    (and ``masks``) tensors.
    """

    def __init__(self, category_to_label: dict[int, int], with_masks: bool, drop_crowd: bool) -> None:
        self.category_to_label = category_to_label
        self.with_masks = with_masks
        self.drop_crowd = drop_crowd

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        height, width = image.shape[-2:]
        boxes = target.get("boxes", torch.zeros(0, 4)).as_subclass(torch.Tensor).float()
        labels = torch.tensor([self.category_to_label[int(c)] for c in target.get("labels", [])], dtype=torch.int64)
        keep = torch.ones(len(labels), dtype=torch.bool)
        if self.drop_crowd:
            crowd = torch.tensor(target.get("iscrowd", []), dtype=torch.bool)
            keep = ~crowd & (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        out: Target = {"image_id": int(target["image_id"]), "boxes": boxes[keep], "labels": labels[keep]}
        if self.with_masks:
            masks = target.get("masks", torch.zeros(0, height, width, dtype=torch.uint8))
            out["masks"] = masks.as_subclass(torch.Tensor)[keep]
        return image.as_subclass(torch.Tensor), out


def collate_detection(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Keep images of different sizes as a list; the detector pads them into one batch."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class CocoDataModule(DataModuleBase):
    """COCO-format detection data: training filters crowds and box-less images, evaluation keeps all."""

    def __init__(
        self,
        root: str,
        batch_size: int,
        num_workers: int,
        num_classes: int,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        with_masks: bool = False,
        hflip_prob: float = 0.5,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor)
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"data.hflip_prob={hflip_prob}: expected a probability in [0, 1]")
        self.root = Path(root)
        self.num_classes = num_classes
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.with_masks = with_masks
        self.hflip_prob = hflip_prob
        self.category_ids: list[int] = []
        self.ground_truths: dict[str, dict[str, Any]] = {}

    def _paths(self, split: str) -> tuple[Path, Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"COCO root not found: {self.root}; set data.root (or DAS_LAB_DATA) to the folder holding "
                "train2017/, val2017/ and annotations/"
            )
        image_dir = self.root / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {image_dir}; extract {split}.zip into {self.root}")
        return image_dir, self.root / "annotations" / f"instances_{split}.json"

    def _set_categories(self, dataset: dict[str, Any], path: Path) -> None:
        categories = dataset["categories"]
        ids = [category["id"] for category in categories]
        if self.category_ids and ids != self.category_ids:
            raise ValueError(
                f"{path}: categories {ids[:5]}... differ from the other split's {self.category_ids[:5]}...; "
                "all splits must list the same categories in the same order"
            )
        if len(ids) != self.num_classes:
            raise ValueError(
                f"data.num_classes={self.num_classes} but {path} defines {len(ids)} categories; "
                f"set data.num_classes={len(ids)}"
            )
        self.category_ids = ids
        self.class_names = [category["name"] for category in categories]

    def _build(self, stage: str) -> CocoImages:
        image_dir, annotation_path = self._paths(self.splits[stage])
        dataset = prepare_ground_truth(load_annotations(annotation_path, self.with_masks))
        self._set_categories(dataset, annotation_path)
        coco = COCO(dataset)
        train = stage == "train"
        if train:
            image_ids = sorted({a["image_id"] for a in dataset["annotations"] if usable_for_training(a)})
            if not image_ids:
                raise ValueError(f"{annotation_path}: no image has a non-crowd box of at least 1x1 pixel to train on")
        else:
            image_ids = sorted(coco.imgs)
            self.ground_truths[stage] = dataset
        steps: list[Callable] = [v2.ToImage()]
        if train and self.hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(self.hflip_prob))
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            CocoTargets({c: i + 1 for i, c in enumerate(self.category_ids)}, self.with_masks, drop_crowd=train),
        ]
        target_keys = {"image_id", "boxes", "labels", "iscrowd"} | ({"masks"} if self.with_masks else set())
        images = CocoImages(image_dir, coco, image_ids, transforms=v2.Compose(steps))
        return wrap_dataset_for_transforms_v2(images, target_keys=target_keys)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._build("train")
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._build("val")
        if stage in (None, "test") and self.test_set is None:
            if self.splits["test"] == self.splits["val"] and self.val_set is not None:
                self.test_set, self.ground_truths["test"] = self.val_set, self.ground_truths["val"]
            else:
                self.test_set = self._build("test")

    def ground_truth(self, stage: str) -> dict[str, Any]:
        """The evaluation split's annotations (COCO dict, pycocotools-valid) for ``stage`` val or test."""
        if stage not in self.ground_truths:
            raise RuntimeError(f"CocoDataModule: no '{stage}' split has been set up; call setup() first")
        return self.ground_truths[stage]

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return collate_detection
