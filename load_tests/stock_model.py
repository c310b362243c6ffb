"""The model file for TorchServe's stock `image_classifier` handler (the benchmark's anchor).

The stock BaseHandler imports this file as model.py, expects exactly one class defined in it, builds it with no
arguments and loads the serialized state_dict into it. Our ResNet-18 at 224 px keeps torchvision's parameter
names, so our checkpoint's state_dict loads here unchanged.
"""

from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=10)
