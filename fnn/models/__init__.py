"""Models assembled from fnn layers: each a ``fnn.Layer`` plus the functions that use it."""
from fnn.models.gpt import (GPT, decode_step, generate, init_cache, lm_loss, sample,
                            value_and_grad)
from fnn.models.bert import Bert, BertForSequenceClassification
from fnn.models.gpt2 import GPT2
from fnn.models.hub import from_pretrained, save_pretrained
from fnn.models.llama import Llama
from fnn.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from fnn.models.vit import VisionTransformer, vit_b_16, vit_b_32, vit_h_14, vit_l_16, vit_l_32

__all__ = ["GPT", "init_cache", "decode_step", "sample", "generate", "value_and_grad", "lm_loss",
           "GPT2", "Llama",
           "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50",
           "Bert", "BertForSequenceClassification",
           "VisionTransformer", "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]
__all__ += ["from_pretrained", "save_pretrained"]
