"""Real training data: `prepare` turns text, JSONL or Parquet into memory-mapped token shards (a `.bin`
of token ids plus an index of document ends per source and split, and a manifest), `shards` reads them
as packed samples, `order` says which sample every global index is, whatever the layout, and `loader`
puts the two together: global indices in, token windows and document segments out.

Torch-free and independent of the trainer, coordinator and parallel code: a worker, the eval process
and `hyrun data prepare` all read the same files through this package."""

from importlib import import_module

# Loaded on first use: `hyrun --help` imports this package's CLI and must not pay for numpy or pydantic.
_EXPORTS = {"DataError": "sources", "PackedSample": "shards", "TokenShards": "shards", "SampleOrder": "order",
            "Stage": "order", "PackedLoader": "loader", "Batch": "loader"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
