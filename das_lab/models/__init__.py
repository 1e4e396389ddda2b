"""das-lab's backbones; importing this package registers them in timm's model registry."""

from das_lab.models import das, das_mobilenet, das_resnet, dat  # noqa: F401  (timm registrations)
