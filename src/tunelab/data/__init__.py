"""Data: readers (files, Parquet/Arrow, the hub), chat templates, tokenization and its cache, prompt
splicing, batching, and the small data sets tunelab writes itself for its demos."""
