"""Layer constructors: every public name here is a function returning a ``fnn.Layer``.

The test suite sweeps ``__all__``: each CamelCase constructor must carry ``@examples(...)``.
"""
from fnn.activations import (Activation, Elu, Gelu, LeakyRelu, LogSoftmax, PRelu, QuickGelu,
                             Relu, Selu, Sigmoid, Softmax, Softplus, Swish, Tanh)
from fnn.combinators import parallel, residual, serial, stack, tied
from fnn.layers.attention import (dot_product_attention, dot_product_attention_backward,
                                  dot_product_attention_bwd, dot_product_attention_fwd,
                                  dot_product_attention_vjp)
from fnn.layers.multi_head_attention import MultiHeadAttention, decode_step, init_cache
from fnn.layers.positional import PositionalEmbedding, SinusoidalPositions, rope, sinusoidal
from fnn.layers.transformer import MLP, TransformerBlock
from fnn.layers.merge import Add, Multiply
from fnn.layers.gated_mlp import GatedMLP
from fnn.layers.patch import ClassToken, PatchEmbedding, SelectToken
from fnn.layers.token_type import TokenTypeEmbedding
from fnn.layers.conv import Conv, ConvTranspose
from fnn.layers.dense import Dense, Embedding, Flatten
from fnn.layers.dropout import Dropout, SpatialDropout
from fnn.layers.pooling import AvgPool, GlobalAvgPool, GlobalMaxPool, MaxPool
from fnn.layers.batch_norm import BatchNorm
from fnn.layers.norm import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from fnn.layers.weight_norm import WeightNorm
from fnn.layers.recurrent import (GRU, LSTM, Bidirectional, SimpleRNN, gru_cell, lstm_cell,
                                  rnn_cell, scan_rnn, scan_rnn_backward)

__all__ = [
    "Activation", "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Gelu", "QuickGelu",
    "Swish", "Softplus", "Softmax", "LogSoftmax", "PRelu",
    "Dense", "Flatten", "Embedding",
    "Conv", "ConvTranspose", "MaxPool", "AvgPool", "GlobalAvgPool", "GlobalMaxPool",
    "BatchNorm", "LayerNorm", "InstanceNorm", "GroupNorm", "RMSNorm", "WeightNorm",
    "Dropout", "SpatialDropout",
    "SimpleRNN", "LSTM", "GRU", "Bidirectional", "rnn_cell", "lstm_cell", "gru_cell",
    "scan_rnn", "scan_rnn_backward",
    "serial", "parallel", "residual", "stack", "tied", "Add", "Multiply",
    "dot_product_attention", "dot_product_attention_backward", "dot_product_attention_vjp",
    "MultiHeadAttention",
    "init_cache", "decode_step", "sinusoidal", "rope", "SinusoidalPositions",
    "PositionalEmbedding", "MLP", "GatedMLP", "TransformerBlock",
    "PatchEmbedding", "ClassToken", "SelectToken", "TokenTypeEmbedding",
]
