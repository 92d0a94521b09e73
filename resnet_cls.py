"""Stage 2 model: torchvision's ResNet34 with a C-way fc, and its logit map.

Input (B, 3, H, W) normalised RGB, or (B, 4, H, W) with the mask as 4th channel
(--mask-mode channel); any H, W >= 32. forward gives logits (B, C); forward(x, pooled=False)
(= forward_map) the logit map L (B, C, H/32, W/32): the fc applied as a 1x1 convolution to the
last feature map. The fc is linear, so the spatial mean of L equals torchvision's avgpool -> fc
exactly: a model trained with the mask-weighted loss needs no mask at inference.

resnet34_state_dict() gives ImageNet weights (torchvision's weights API, downloads once) or a
local torchvision-format file; load_backbone() puts them into this model or into unet.py's
encoder, fc dropped.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import ResNet34_Weights, resnet34


def resnet34_state_dict(pretrained=False, weights_file=None):
    """A torchvision resnet34 state dict (ImageNet or from a file), or None for random init."""
    if weights_file is not None:
        path = Path(weights_file)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise SystemExit(f"--weights {path}: file not found") from None
        except Exception as e:  # pickle, zip and EOF errors: the message says which
            # the first sentence only, not torch advice to retry unsafely (it would run the code)
            first = str(e).split(". ")[0][:200]
            why = f"{type(e).__name__}: {first}"
            raise SystemExit(f"--weights {path}: not a readable state dict ({why})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # accept a checkpoint dict that holds the state dict
        if not isinstance(state, dict) or "conv1.weight" not in state:
            raise SystemExit(f"--weights {path}: not a torchvision resnet34 state dict "
                             "(no conv1.weight)")
        odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if odd:
            kind = type(state[odd[0]]).__name__
            raise SystemExit(f"--weights {path}: {odd[0]!r} is a {kind}, not a tensor")
        return state
    if pretrained:
        try:
            return ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # URLError, socket errors: no internet
            url = ResNet34_Weights.IMAGENET1K_V1.url
            raise SystemExit("--pretrained: could not get ImageNet weights from torchvision "
                             f"({type(e).__name__}: {e}). Offline? Download {url} elsewhere "
                             "and pass --weights FILE.") from None
    return None


def load_backbone(module, state, source="state dict"):
    """Load a torchvision resnet34 state dict into `module` (a torchvision ResNet), fc excluded;
    or the backbone of our classifier ("backbone.*") or the encoder of our masker ("encoder.*")
    from their state dicts.

    conv1 may have a 4th input channel: its RGB filters come from `state`, the 4th stays as is.
    Raises SystemExit naming `source` when keys or shapes don't match.
    state None: nothing to load (random init).
    """
    if state is None:
        return
    prefix = ""
    for ours in ("backbone.", "encoder."):
        if any(k.startswith(ours) for k in state):
            prefix = ours
            break
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    own_conv1 = module.conv1.weight
    narrower = conv1 is not None and conv1.shape[1] < own_conv1.shape[1]
    if narrower:
        widened = own_conv1.detach().clone()
        widened[:, :conv1.shape[1]] = conv1
        state["conv1.weight"] = widened
    own = {k for k in module.state_dict() if not k.startswith("fc.")}
    missing = sorted(own - state.keys())
    unexpected = sorted(state.keys() - own)
    if missing or unexpected:
        raise SystemExit(f"{source}: not a resnet34 backbone "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        last_line = str(e).splitlines()[-1].strip()
        raise SystemExit(f"{source}: shapes don't match resnet34 ({last_line})") from None


class ResNetClassifier(nn.Module):
    """torchvision resnet34 (as `backbone`, its key names unchanged) with a num_classes fc."""

    def __init__(self, num_classes=5, in_channels=3):
        super().__init__()
        self.backbone = resnet34(num_classes=num_classes)
        if in_channels != 3:
            # the mask channel gets its own filter, zero at start so pretrained RGB filters
            # behave exactly as before until training finds a use for the mask
            conv = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[:, :3] = self.backbone.conv1.weight
            self.backbone.conv1 = conv
        self.in_channels = in_channels

    def features(self, x):
        """(B, in_channels, H, W) -> (B, 512, H/32, W/32)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))   # (B, 64, H/4, W/4)
        x = b.layer1(x)                             # (B, 64, H/4, W/4)
        x = b.layer2(x)                             # (B, 128, H/8, W/8)
        x = b.layer3(x)                             # (B, 256, H/16, W/16)
        return b.layer4(x)                          # (B, 512, H/32, W/32)

    def forward_map(self, x):
        """(B, in_channels, H, W) -> logit map (B, C, H/32, W/32)."""
        fc = self.backbone.fc
        return F.conv2d(self.features(x), fc.weight[:, :, None, None], fc.bias)

    def forward(self, x, pooled=True):
        """(B, in_channels, H, W) -> logits (B, C), the spatial mean of the logit map;
        pooled=False: the map itself. Training calls model(x, pooled=False), not forward_map,
        so that a DistributedDataParallel wrapper sees the call."""
        logit_map = self.forward_map(x)
        if not pooled:
            return logit_map
        return logit_map.mean((2, 3))


def build_classifier(num_classes, in_channels=3, state=None, source="state dict"):
    """A ResNetClassifier, its backbone loaded from a resnet34 state dict when one is given."""
    model = ResNetClassifier(num_classes, in_channels)
    load_backbone(model.backbone, state, source=str(source))
    return model
