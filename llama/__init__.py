"""Run Meta's Llama checkpoints for text generation on CPU, MPS or CUDA, with or without torchrun."""

from llama.args import ModelArgs
from llama.chat_format import ChatPrediction, CompletionPrediction, Dialog, Message
from llama.errors import CheckpointError, DistributedError, InputError
from llama.generation import Llama
from llama.model import Transformer
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "CheckpointError",
    "CompletionPrediction",
    "Dialog",
    "DistributedError",
    "InputError",
    "Llama",
    "Message",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
]
