"""Stage 1 model: a UNet with torchvision's ResNet34 as encoder.

Input (B, 3, H, W) normalised RGB with H, W divisible by 32; output (B, 1, H, W) logits of
"this pixel is the white cell". Encoder: resnet34's conv1/bn1/relu, maxpool, layer1..4 under
their torchvision names (`encoder.*`), so ImageNet weights load unchanged; hand-written decoder:
at each scale upsample x2, concatenate the encoder skip of that scale, two 3x3 conv-BN-ReLU;
a last block back to full size; a 1x1 conv to one logit. Decoder as in Ronneberger et al. 2015
and segmentation_models_pytorch's Unet(resnet34).
ImageNet weights: resnet_cls.load_backbone(unet.encoder, ...).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet34

# conv1 (H/2), layer1 (H/4), layer2 (H/8), layer3 (H/16), layer4 (H/32)
ENCODER_CHANNELS = (64, 64, 128, 256, 512)
# H/16, H/8, H/4, H/2, H
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def conv_bn_relu(in_ch, out_ch):
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)   # BatchNorm follows
    norm = nn.BatchNorm2d(out_ch)
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip (if any), two conv-BN-ReLU."""

    def __init__(self, in_ch, skip_ch, out_ch):
        super().__init__()
        first = conv_bn_relu(in_ch + skip_ch, out_ch)
        second = conv_bn_relu(out_ch, out_ch)
        self.convs = nn.Sequential(first, second)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = resnet34()
        self.encoder.fc = nn.Identity()  # unused: the encoder stops at layer4
        skips = ENCODER_CHANNELS[-2::-1] + (0,)                 # (256, 128, 64, 64, 0)
        ins = (ENCODER_CHANNELS[-1],) + DECODER_CHANNELS[:-1]   # (512, 256, 128, 64, 32)
        blocks = [UpBlock(i, s, o) for i, s, o in zip(ins, skips, DECODER_CHANNELS)]
        self.up = nn.ModuleList(blocks)
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], 1, kernel_size=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"UNet input is {h}x{w}: pad or resize to a multiple of 32")
        e = self.encoder
        s1 = e.relu(e.bn1(e.conv1(x)))    # (B, 64, H/2, W/2)
        s2 = e.layer1(e.maxpool(s1))      # (B, 64, H/4, W/4)
        s3 = e.layer2(s2)                 # (B, 128, H/8, W/8)
        s4 = e.layer3(s3)                 # (B, 256, H/16, W/16)
        x = e.layer4(s4)                  # (B, 512, H/32, W/32)
        x = self.up[0](x, s4)             # (B, 256, H/16, W/16)
        x = self.up[1](x, s3)             # (B, 128, H/8, W/8)
        x = self.up[2](x, s2)             # (B, 64, H/4, W/4)
        x = self.up[3](x, s1)             # (B, 32, H/2, W/2)
        x = self.up[4](x)                 # (B, 16, H, W)
        return self.head(x)               # (B, 1, H, W)
