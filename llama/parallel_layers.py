"""fairscale's model-parallel layers, built on the meta device so that loading assigns weights without a first copy.

fairscale's own constructors allocate and initialise a full-size master weight on every rank; these
subclasses keep its attributes and shard layout, skip that, and send their collectives through
``llama.distributed`` (shared memory between processes on one CPU, else torch.distributed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from llama import distributed


def _meta_parameter(*shape: int) -> nn.Parameter:
    # Llama.build constructs under torch.device("meta"); built elsewhere, the weights are uninitialised memory.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _local_size(size: int, what: str) -> int:
    world_size = get_model_parallel_world_size()
    if size % world_size:
        raise ValueError(f"{what}={size} does not split over model_parallel_size={world_size}")
    return size // world_size


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """``y = x @ W.T`` with W's rows (output features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        self.output_size_per_partition = _local_size(out_features, "out_features")
        self.weight = _meta_parameter(self.output_size_per_partition, in_features)
        self.bias = None
        self.master_weight = None

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output = F.linear(input_, self.weight)
        return distributed.all_gather(output) if self.gather_output else output


class RowParallelLinear(fs_layers.RowParallelLinear):
    """``y = x @ W.T`` with W's columns (input features) split across ranks and the outputs all-reduced."""

    def __init__(self, in_features: int, out_features: int) -> None:
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = True
        self.input_size_per_partition = _local_size(in_features, "in_features")
        self.weight = _meta_parameter(out_features, self.input_size_per_partition)
        self.bias = None
        self.master_weight = None

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(F.linear(input_, self.weight))


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
        self.weight = _meta_parameter(num_embeddings, self.embedding_dim_per_partition)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather(F.embedding(input_, self.weight))
