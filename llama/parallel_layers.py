"""fairscale's model-parallel layers, built on the meta device so that loading assigns weights without a first copy.

fairscale's own constructors allocate and initialise a full-size master weight on every rank; these
subclasses keep its attributes and shard layout, skip that, and send their collectives through
``llama.distributed`` (shared memory between processes on one CPU, else torch.distributed). The linear layers
also take quantized weights (``llama.quantize``): loading a state dict that holds ``weight_scale`` beside a weight
gives the layer that weight's quantized layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from llama import distributed, quantize


def _meta_parameter(*shape: int) -> nn.Parameter:
    # Llama.build constructs under torch.device("meta"); built elsewhere, the weights are uninitialised memory.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _local_size(size: int, what: str) -> int:
    world_size = get_model_parallel_world_size()
    if size % world_size:
        raise ValueError(f"{what}={size} does not split over model_parallel_size={world_size}")
    return size // world_size


class _QuantizableLinear(nn.Module):
    """``weight`` and, once a quantized weight is loaded, ``weight_scale``; ``_linear`` applies either."""

    weight: nn.Parameter

    def _init_scale(self) -> None:
        self.register_parameter("weight_scale", None)  # a quantized weight's scales, assigned with it by loading

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        scale = state_dict.get(prefix + "weight_scale")
        weight = state_dict.get(prefix + "weight")
        if scale is not None and weight is not None:
            # A quantized weight, in llama.quantize's running layout: placeholders of its shapes and dtypes take
            # the float weight's place, so that load_state_dict(assign=True, strict=True) assigns and checks it.
            self.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
            self.weight_scale = nn.Parameter(torch.empty_like(scale, device="meta"), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _linear(self, input_: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            return F.linear(input_, self.weight)
        return quantize.linear(input_, self.weight, self.weight_scale)


class ColumnParallelLinear(_QuantizableLinear, fs_layers.ColumnParallelLinear):
    """``y = x @ W.T`` with W's rows (output features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.output_size_per_partition = _local_size(out_features, "out_features")
        self.split = get_model_parallel_world_size() > 1  # a group of one makes no collective (nor a graph break)
        self.weight = _meta_parameter(self.output_size_per_partition, in_features)
        self._init_scale()
        self.bias = None
        self.master_weight = None

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output = self._linear(input_)
        return distributed.all_gather(output) if self.gather_output and self.split else output


class RowParallelLinear(_QuantizableLinear, fs_layers.RowParallelLinear):
    """``y = x @ W.T`` with W's columns (input features) split across ranks and the outputs all-reduced."""

    def __init__(self, in_features: int, out_features: int) -> None:
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = True
        self.input_size_per_partition = _local_size(in_features, "in_features")
        self.split = get_model_parallel_world_size() > 1
        self.weight = _meta_parameter(out_features, self.input_size_per_partition)
        self._init_scale()
        self.bias = None
        self.master_weight = None

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output = self._linear(input_)
        return distributed.all_reduce(output) if self.split else output


class ParallelEmbedding(fs_layers.ParallelEmbedding):
    """Embedding table split along the embedding dimension, gathered after lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self._weight = None
        self.embedding_dim_per_partition = _local_size(embedding_dim, "embedding_dim")
        self.split = get_model_parallel_world_size() > 1
        self.weight = _meta_parameter(num_embeddings, self.embedding_dim_per_partition)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output = F.embedding(input_, self.weight)
        return distributed.all_gather(output) if self.split else output
