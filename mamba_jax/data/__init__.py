"""Data: grain pipelines and synthetic tasks."""
from mamba_jax.data.synthetic import (
    SPLITS,
    TASKS,
    MQARTask,
    SelectiveCopyTask,
    example_rng,
    get_batch,
    make_dataset,
    make_task,
)

__all__ = ["MQARTask", "SPLITS", "SelectiveCopyTask", "TASKS", "example_rng", "get_batch", "make_dataset",
           "make_task"]
from mamba_jax.data.text import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    TextLMData,
    default_text_root,
    pack_documents,
    packed_text_rows,
    read_documents,
    text_dataset,
    text_files,
    text_iterator,
    train_bpe_tokenizer,
)

__all__ += ["BPETokenizer", "ByteTokenizer", "CharTokenizer", "HFTokenizer", "TextLMData", "default_text_root", "pack_documents",
            "packed_text_rows", "read_documents", "text_dataset", "text_files", "text_iterator",
            "train_bpe_tokenizer"]
