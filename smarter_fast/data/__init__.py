"""CS224N readers, the WordPiece tokenizer, length-aware batching and task schedules."""

from .batching import (
    EncodedDataset,
    LengthBucketSampler,
    collate,
    pad_batch,
    padding_fraction,
    random_batch_sampler,
    to_packed,
    to_padded,
    unpack,
)
from .cs224n import (
    CS224NSplit,
    DataError,
    PairExample,
    ReadReport,
    SentenceExample,
    find_data_files,
    load_cs224n,
    read_quora,
    read_sst,
    read_sts,
    read_task_file,
)
from .tokenize import encode_pairs, encode_sentences, load_tokenizer

__all__ = [
    "CS224NSplit",
    "DataError",
    "EncodedDataset",
    "LengthBucketSampler",
    "PairExample",
    "ReadReport",
    "SentenceExample",
    "collate",
    "encode_pairs",
    "encode_sentences",
    "find_data_files",
    "load_cs224n",
    "load_tokenizer",
    "pad_batch",
    "padding_fraction",
    "random_batch_sampler",
    "read_quora",
    "read_sst",
    "read_sts",
    "read_task_file",
    "to_packed",
    "to_padded",
    "unpack",
]
