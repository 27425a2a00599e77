"""Data pipeline: tokenizer, corpus preparation into token shards, memory-mapped loading and sampling."""


class DataError(ValueError):
    """A user-facing data problem (missing/empty/corrupt input or shard); the message is one line and names the path."""


__all__ = ["DataError"]
